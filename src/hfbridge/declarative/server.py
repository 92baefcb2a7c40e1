"""What ``POST /predict`` does for a declarative LLM, without HTTP: :mod:`hfbridge.serving` mounts it.

The body is ``{"records": [{column: value, ...}, ...]}`` (``"inputs"`` is the same), one record object, or a
list of records; the answer is the rows ``LLM.predict`` gives (a category output adds each label's probability).
"""

from __future__ import annotations

from hfbridge.declarative.dataset import DatasetError, check_rows
from hfbridge.declarative.llm import LLM


class PredictRequestError(ValueError):
    """A ``/predict`` body that cannot be answered, with the HTTP status it deserves."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def predict_records(llm: LLM, body, max_records: int) -> list[dict]:
    """The records of a ``/predict`` body, checked against the LLM's config (columns, at most ``max_records``)."""
    records = body.get("records", body.get("inputs")) if isinstance(body, dict) else body
    if isinstance(body, dict) and records is None:
        records = [body]
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise PredictRequestError("expected {\"records\": [{column: value, ...}, ...]} or one record object")
    if len(records) > max_records:
        raise PredictRequestError(f"{len(records)} records in one request; the limit is {max_records}", 413)
    try:
        check_rows([(f"records[{i}]", r) for i, r in enumerate(records)], llm.config_obj, need_target=False)
    except DatasetError as e:
        raise PredictRequestError(str(e)) from None
    return records
