"""Data curation steps: readers, normalization, quality filters, PII scrubbing, dedup, decontamination.

Every step is a plain function or class over `pyarrow` tables of documents (see `documents.py`),
executor-agnostic: a Dagster asset calls it today, a Ray task could tomorrow. Dropped documents are
returned with a reason, never silently discarded.
"""
