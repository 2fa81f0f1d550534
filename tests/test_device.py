"""`device=auto|cpu|cuda` (conf/config.yaml) reaches training, inference, the evaluation and the benchmark: auto is
the CPU on a machine without a GPU, and cuda there is a one-line error before any work."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator

from s2match.config import PROJECT_ROOT, compose_config
from s2match.evaluation.runner import Method, method_specs
from s2match.twoview.pipeline import TwoViewPipeline, pipeline_config

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")

CUDA_ERROR = "device=cuda: no CUDA GPU is available here (use device=auto or device=cpu)"


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_script", PROJECT_ROOT / "src" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_auto_is_the_cpu_here(tmp_path):
    cfg = compose_config(["device=auto", f"paths.train={tmp_path}"])
    trainer = load_train_script().build_trainer(cfg, False, [])
    assert isinstance(trainer.accelerator, CPUAccelerator)
    pipeline = TwoViewPipeline.from_config(pipeline_config(cfg))
    assert pipeline.describe()["device"] == "cpu"
    assert next(pipeline.matcher.parameters()).device.type == "cpu"


def test_evaluation_and_benchmark_methods_take_the_device():
    specs = {spec.name: spec for spec in method_specs(compose_config(["device=cuda"]))}
    assert specs["fast"].config["device"] == "cuda"
    with pytest.raises(ValueError, match="no CUDA GPU is available here"):
        Method(specs["fast"])  # what the evaluate stage and `python -m s2match.bench` build for each method


@pytest.mark.parametrize("script", [["src/train.py"], ["src/infer.py", "+pair=demo"]])
def test_cuda_without_a_gpu_is_a_one_line_error(script, tmp_path):
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / script[0]), *script[1:], "device=cuda",
                           f"paths.train={tmp_path / 'train'}", f"infer.output_dir={tmp_path / 'infer'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: {CUDA_ERROR}"]
    assert not any(tmp_path.iterdir())
