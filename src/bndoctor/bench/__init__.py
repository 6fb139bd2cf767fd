"""The evidence harness: scenarios on scikit-learn's digits, a runner, and a report.

Needs the ``demo`` extra (scikit-learn for the data, matplotlib for plots).
"""

from .runner import RunResult, SuiteResult, run_scenario, run_suite
from .scenarios import DEMO, DEMO_MNIST1D, SCENARIOS, Scenario, get_scenario, register, resolve

__all__ = [
    "DEMO",
    "DEMO_MNIST1D",
    "SCENARIOS",
    "RunResult",
    "Scenario",
    "SuiteResult",
    "get_scenario",
    "register",
    "resolve",
    "run_scenario",
    "run_suite",
]
