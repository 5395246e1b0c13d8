"""The Kedro pipelines of atop, one sub-package per stage (registered in atop.pipeline_registry)."""
