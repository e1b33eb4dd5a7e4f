"""llm-flywheel: the pure core (document/sample types, curation steps, policies, config, CLI).

Nothing in this package imports Dagster except `flywheel.definitions` and `flywheel.cli`.
"""

__version__ = "0.1.0"
