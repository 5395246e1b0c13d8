"""Great Expectations suites: ingested data (:mod:`.data`) and adversarial examples
(:mod:`.adversarial`), both run through :func:`.core.validate_table`."""

from atop.validation.core import DataValidationError, validate_table

__all__ = ["DataValidationError", "validate_table"]
