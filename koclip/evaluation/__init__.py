"""Evaluating koclip models: metrics (pure functions), datasets, zero-shot classification, retrieval,
and the published benchmarks compared across models.

    from koclip.evaluation import evaluate_zeroshot, open_dataset
    print(evaluate_zeroshot(model, processor, open_dataset("fashion-mnist"))["top1"])

    from koclip.evaluation import open_benchmark
    from koclip.evaluation.compare import compare, prompt_settings
    rows = compare(["koclip-mini"], open_benchmark("fashion-mnist"), name="fashion-mnist", lang="ko",
                   prompts=prompt_settings("zeroshot", "ko"))
"""

from koclip.evaluation.benchmarks import BENCHMARKS, open_benchmark
from koclip.evaluation.datasets import open_dataset
from koclip.evaluation.metrics import recall_at_k, retrieval_metrics, topk_accuracy
from koclip.evaluation.retrieval import evaluate_retrieval
from koclip.evaluation.zeroshot import evaluate_zeroshot

__all__ = ["open_dataset", "open_benchmark", "BENCHMARKS", "recall_at_k", "retrieval_metrics", "topk_accuracy",
           "evaluate_zeroshot", "evaluate_retrieval"]
