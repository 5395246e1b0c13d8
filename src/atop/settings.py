"""Kedro project settings."""

from atop.config import AtopConfigLoader
from atop.hooks import DataDocsHooks, RunGuardHooks, TelemetryOffHooks
from atop.params import fraction

# pluggy calls the last registered first: the run guard checks (and may refuse) the run
# before the Data Docs hook starts recording it.
HOOKS = (TelemetryOffHooks(), DataDocsHooks(), RunGuardHooks())

# Parameters: conf/base, conf/<env>, then params/overrides.yaml (`dvc exp run -S`), then --params.
CONFIG_LOADER_CLASS = AtopConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    # `conf/local` overlays `conf/base` by default; `--env smoke|paper` picks a profile.
    "default_run_env": "local",
    # A profile (conf/smoke, conf/paper) only lists the keys it changes: deep-merge them
    # over conf/base instead of replacing whole top-level entries.
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
    # Budgets have one spelling: `eps: ${frac:8/255}` (atop.params.fraction).
    "custom_resolvers": {"frac": fraction},
}
