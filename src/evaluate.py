"""DVC stage `evaluate`: SIFT, the pretrained LightGlues and the trained matcher, step by step, on the test pairs
(see s2match.evaluation); writes paths.evaluate and one MLflow run."""

from s2match.cli import run
from s2match.evaluation.report import FILES
from s2match.evaluation.runner import evaluate_methods


def main(cfg) -> None:
    evaluation = evaluate_methods(cfg)
    print((evaluation.out_dir / FILES["report"]).read_text())
    print(f"{evaluation.out_dir}: written; MLflow run {evaluation.run_id}")


if __name__ == "__main__":
    run(main, __doc__, ("evaluate",))
