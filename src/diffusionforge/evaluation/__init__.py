"""Reproducible evaluation: numbers together with the protocol that produced them."""

from .evaluate import EvalResult, evaluate_run, metrics_record
from .protocol import EvalProtocol

__all__ = ["EvalProtocol", "EvalResult", "evaluate_run", "metrics_record"]
