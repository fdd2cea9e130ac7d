"""Deprecated: use :mod:`minigpt.losses.common` (kept until every importer has moved)."""
from .common import IGNORE_INDEX, REDUCTIONS, check_float_pair, check_reduction, reduce  # noqa: F401
