"""Comparisons of interventions with weight-space methods, representation metrics and plots
(installed as ``reftkit.analysis``; built out by the analysis issue)."""
