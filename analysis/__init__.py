"""Figures and an HTML report from run folders (`meerkat-ray analyze DIR`).

Reads only the files of run folders (config.yaml, metrics.jsonl, path.parquet, clients.json,
summary.json) and sweep folders (sweep.yaml); it never imports the training code, torch or Ray, so
it runs anywhere pandas and matplotlib do, on finished runs and on runs still going.

    from analysis import analyze
    report = analyze("runs/meerkat-vp-demo")          # -> runs/meerkat-vp-demo/analysis/report.html
"""
from .report import Report, analyze
from .runs import AnalysisError, Collection, Run, load, load_run

__all__ = ["AnalysisError", "Collection", "Report", "Run", "analyze", "load", "load_run"]
