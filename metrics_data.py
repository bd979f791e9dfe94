"""Ad-metrics data from outside the API: the deterministic demo set and the load-metrics CSV."""

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from math import prod

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from models import DIMENSIONS, MEASURES, MetricsCsvRow, date_id_of

# The demo's dimension values, each with its weight in the audience (and the platform's and
# placement's typical prices and click-through rates below).
DEMO_VALUES: dict[str, dict[str, float]] = {
    "region": {
        "United States": 3.0, "India": 2.6, "Brazil": 1.8, "Indonesia": 1.6, "Mexico": 1.3,
        "United Kingdom": 1.2, "Germany": 1.1, "France": 1.0, "Japan": 0.9, "Turkey": 0.9,
        "Italy": 0.8, "Spain": 0.8, "Canada": 0.7, "South Korea": 0.6, "Poland": 0.5,
        "Argentina": 0.5, "Nigeria": 0.5, "South Africa": 0.4, "Australia": 0.4,
        "Netherlands": 0.3,
    },
    "age_group": {
        "13-17": 0.4, "18-24": 1.2, "25-34": 1.5, "35-44": 1.2, "45-54": 0.9, "55-64": 0.6,
        "65+": 0.4,
    },
    "gender": {"female": 1.0, "male": 1.0, "unknown": 0.15},
    "platform": {"facebook": 1.4, "instagram": 1.2, "messenger": 0.3, "audience_network": 0.5},
    "placement": {
        "feed": 1.5, "stories": 1.0, "reels": 1.1, "right_column": 0.3, "marketplace": 0.4,
        "search": 0.3, "video_feeds": 0.6, "in_stream_video": 0.5,
    },
    "device_type": {"mobile": 1.6, "desktop": 0.6, "tablet": 0.2, "connected_tv": 0.1},
}  # fmt: skip
PLATFORM_CPM = {"facebook": 9.0, "instagram": 11.0, "messenger": 5.0, "audience_network": 3.5}
PLATFORM_LIKE_RATE = {
    "facebook": 0.012,
    "instagram": 0.02,
    "messenger": 0.001,
    "audience_network": 0.0,
}
PLACEMENT_CTR = {
    "feed": 0.012, "stories": 0.008, "reels": 0.009, "right_column": 0.004, "marketplace": 0.010,
    "search": 0.020, "video_feeds": 0.006, "in_stream_video": 0.005,
}  # fmt: skip
# Impressions of an average row before the weights apply.
BASE_IMPRESSIONS = 400

# Columns of the fact table in the order the generators and loaders write them.
FACT_COLUMNS = ("date_id", *(dimension.id_column for dimension in DIMENSIONS.values()), *MEASURES)
CSV_COLUMNS = ("date", *DIMENSIONS, *MEASURES)
COMBINATIONS = prod(len(values) for values in DEMO_VALUES.values())
PLATFORM_AXIS = list(DEMO_VALUES).index("platform")
PLACEMENT_AXIS = list(DEMO_VALUES).index("placement")
assert list(DEMO_VALUES) == list(DIMENSIONS), "the demo axes follow the fact's key order"


@dataclass(frozen=True)
class Combinations:
    """Every combination of demo dimension values, by index (the last dimension varies fastest):
    its fact key columns and its traits, as arrays, so that a day is drawn in a few array
    operations."""

    ids: npt.NDArray[np.int64]  # (COMBINATIONS, dimensions), the fact's key order
    weight: npt.NDArray[np.float64]
    click_rate: npt.NDArray[np.float64]
    like_rate: npt.NDArray[np.float64]
    cpm: npt.NDArray[np.float64]


def demo_combinations(ids: dict[str, list[int]]) -> Combinations:
    """Every combination of the demo values, given each value's id (DEMO_VALUES order)."""
    grid = np.indices([len(values) for values in DEMO_VALUES.values()]).reshape(
        len(DEMO_VALUES), -1
    )
    names = list(DEMO_VALUES)

    def per_combination(axis: int, values: Iterable[float]) -> npt.NDArray[np.float64]:
        by_value = np.array(list(values), dtype=np.float64)
        spread: npt.NDArray[np.float64] = by_value[grid[axis]]
        return spread

    weight = np.ones(COMBINATIONS)
    for axis, name in enumerate(names):
        weight *= per_combination(axis, DEMO_VALUES[name].values())
    platforms, placements = DEMO_VALUES["platform"], DEMO_VALUES["placement"]
    return Combinations(
        ids=np.stack(
            [np.array(ids[name], dtype=np.int64)[grid[axis]] for axis, name in enumerate(names)],
            axis=1,
        ),
        weight=weight,
        click_rate=per_combination(PLACEMENT_AXIS, (PLACEMENT_CTR[p] for p in placements)),
        like_rate=per_combination(PLATFORM_AXIS, (PLATFORM_LIKE_RATE[p] for p in platforms)),
        cpm=per_combination(PLATFORM_AXIS, (PLATFORM_CPM[p] for p in platforms)),
    )


def demo_day(
    day: date, rows: int, seed: int, combinations: Combinations
) -> list[npt.NDArray[np.int64]]:
    """The columns (FACT_COLUMNS, cost in cents) of one day: `rows` distinct combinations, the
    same for the same day, size and seed. Clicks never exceed impressions, nor conversions
    clicks."""
    rng = np.random.default_rng([seed, date_id_of(day)])
    index = np.sort(rng.choice(COMBINATIONS, size=rows, replace=False))
    weekday_factor = 0.85 if day.weekday() >= 5 else 1.0
    weight = weekday_factor * combinations.weight[index]
    impressions = (BASE_IMPRESSIONS * weight * rng.lognormal(0, 0.6, rows)).astype(np.int64) + 1
    clicks = (impressions * combinations.click_rate[index] * rng.uniform(0.5, 1.5, rows)).astype(
        np.int64
    )
    conversions = (clicks * rng.uniform(0.01, 0.12, rows)).astype(np.int64)
    likes = (impressions * combinations.like_rate[index] * rng.random(rows)).astype(np.int64)
    cents = (impressions * combinations.cpm[index] * rng.uniform(0.7, 1.3, rows) / 10).astype(
        np.int64
    )
    date_ids = np.full(rows, date_id_of(day), dtype=np.int64)
    keys = combinations.ids[index]
    return [date_ids, *keys.T, impressions, clicks, cents, conversions, likes]


@dataclass
class CsvCheck:
    """What a pass over a load-metrics file found: errors, or the values it will need."""

    errors: list[tuple[int, str]] = field(default_factory=list)  # (line number, problem)
    error_count: int = 0
    rows: int = 0
    # Per dimension, casefolded name -> the name as first spelled in the file.
    names: dict[str, dict[str, str]] = field(
        default_factory=lambda: {name: {} for name in DIMENSIONS}
    )
    dates: set[date] = field(default_factory=set)


# At most this many errors are listed; the rest are counted.
MAX_LISTED_ERRORS = 50


def read_metrics_csv(lines: Iterable[str]) -> Iterator[tuple[int, MetricsCsvRow | list[str]]]:
    """(line number, row) for each data line, or (line number, its errors)."""
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None or [column.strip() for column in header] != list(CSV_COLUMNS):
        yield 1, [f"the header must be: {','.join(CSV_COLUMNS)}"]
        return
    for values in reader:
        number = reader.line_num
        if len(values) != len(CSV_COLUMNS):
            yield number, [f"expected {len(CSV_COLUMNS)} fields, found {len(values)}"]
            continue
        try:
            yield number, MetricsCsvRow.model_validate(dict(zip(CSV_COLUMNS, values, strict=True)))
        except ValidationError as error:
            yield number, [f"{e['loc'][0]}: {e['msg']}" for e in error.errors()]


def check_metrics_csv(lines: Iterable[str]) -> CsvCheck:
    """Validate a whole file, collecting every error and the dimension values and dates used."""
    check = CsvCheck()
    for number, row in read_metrics_csv(lines):
        if isinstance(row, MetricsCsvRow):
            check.rows += 1
            check.dates.add(row.date)
            for name in DIMENSIONS:
                value = getattr(row, name)
                check.names[name].setdefault(value.casefold(), value)
            continue
        check.error_count += len(row)
        room = MAX_LISTED_ERRORS - len(check.errors)
        check.errors += [(number, message) for message in row[: max(room, 0)]]
    return check


def staging_line(number: int, row: MetricsCsvRow, ids: dict[str, dict[str, int]]) -> str:
    """A CSV line for the staging table: line number, FACT_COLUMNS."""
    keys = ",".join(str(ids[name][getattr(row, name).casefold()]) for name in DIMENSIONS)
    measures = ",".join(str(getattr(row, name)) for name in MEASURES)
    return f"{number},{date_id_of(row.date)},{keys},{measures}\n"
