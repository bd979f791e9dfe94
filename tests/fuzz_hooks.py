"""Schemathesis hooks (SCHEMATHESIS_HOOKS=tests.fuzz_hooks): rules that span several parameters
or depend on the data, and preconditions on the pet's current ETag. Positive cases are made to
follow them, as a client reading the documentation would; negative ones are left alone. (What a
name may hold is the schema's own pattern: the hooks leave names as generated.)"""

import re
from datetime import date, timedelta
from typing import Any

import schemathesis

from metrics_data import DEMO_VALUES
from models import DIMENSIONS, METRICS
from name_rule import name_problem
from settings import Settings

MAX_SPAN_DAYS = Settings.model_fields["METRICS_MAX_SPAN_DAYS"].default


def _as_date(value: Any) -> date | None:
    try:
        return date.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _follow_metrics_rules(query: dict[str, Any]) -> None:
    start, end = _as_date(query.get("start_date")), _as_date(query.get("end_date"))
    if (start is None) != (end is None):  # the two go together
        query.pop("start_date", None)
        query.pop("end_date", None)
    elif start is not None and end is not None:
        query.pop("preset", None)  # a range or a preset, not both
        start, end = min(start, end), max(start, end)
        start = max(start, end - timedelta(days=MAX_SPAN_DAYS - 1))
        query["start_date"], query["end_date"] = start.isoformat(), end.isoformat()
    groups = query.get("group_by", [])
    groups = groups if isinstance(groups, list) else [groups]
    fields = query.get("fields", [])
    if isinstance(fields, list) and fields:  # each at most once
        fields = query["fields"] = list(dict.fromkeys(fields))
    returned = fields if isinstance(fields, list) and fields else list(METRICS)
    sort = query.get("sort")
    if isinstance(sort, str) and sort.removeprefix("-") not in [*groups, *returned]:
        del query["sort"]  # a sort on something the result holds
    conditions = query.get("where")
    if isinstance(conditions, list):  # conditions on metrics the result holds
        query["where"] = [
            c for c in conditions
            if not isinstance(c, str) or re.split(r"[<>=!]", c, maxsplit=1)[0] in returned
        ]  # fmt: skip
    for name in DIMENSIONS:  # filter values that exist (the fuzz database holds the demo set)
        known = list(DEMO_VALUES[name])
        for parameter in (name, f"exclude_{name}"):
            values = query.get(parameter)
            if isinstance(values, list):
                query[parameter] = [
                    known[i % len(known)] if isinstance(v, str) and name_problem(v) is None else v
                    for i, v in enumerate(values)
                ]


@schemathesis.hook
def map_case(
    _context: schemathesis.HookContext, case: schemathesis.Case[Any]
) -> schemathesis.Case[Any]:
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    questions = ("/metrics", "/metrics/export")
    if positive and case.operation.path in questions and isinstance(case.query, dict):
        _follow_metrics_rules(case.query)
    if positive and case.operation.path.startswith("/pets"):
        # An ETag the client has not seen cannot match: such a client sends none.
        for name in [h for h in case.headers or {} if h.lower() in ("if-match", "if-none-match")]:
            del case.headers[name]
    return case
