"""The memory and time planner: ``bigtrain plan`` and the fit check before launches. No torch.

Pure arithmetic from the config, so that it runs on login nodes: ``shapes`` (parameter counts and
FLOPs of the transformers GPT-2 and Llama classes bigtrain builds, checked against them on the
meta device in the tests), ``memory`` (per-rank bytes term by term for each engine), ``fit``
(devices, step time, budget, the cheapest change that fits), ``cli`` (the command and the check).
"""

from launcher.plan.cli import add_fit_options, add_plan_parser, check_fits
from launcher.plan.fit import DEVICE_NAMES, DEVICES, Fit, cheapest_fit, device_named, plan_fit, step_time
from launcher.plan.memory import Estimate, Setup, activations, estimate
from launcher.plan.shapes import Shape, shape_of

__all__ = ["DEVICES", "DEVICE_NAMES", "Estimate", "Fit", "Setup", "Shape", "activations", "add_fit_options",
           "add_plan_parser", "cheapest_fit", "check_fits", "device_named", "estimate", "plan_fit", "shape_of",
           "step_time"]
