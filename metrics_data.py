"""Ad-metrics data from outside the API: the deterministic demo set and the load-metrics CSV."""

import csv
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from itertools import product
from math import prod

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
class Combination:
    """One combination of demo dimension values: its fact key columns and its traits."""

    keys: str  # "region_id,age_id,gender_id,platform_id,placement_id,device_type_id"
    weight: float
    click_rate: float
    like_rate: float
    cpm: float


def demo_combinations(ids: dict[str, list[int]]) -> list[Combination]:
    """Every combination, in the order of its index (the last dimension varies fastest), worked
    out once per run so that generating a row is a lookup and a few random draws."""
    axes = [list(zip(ids[name], DEMO_VALUES[name].items(), strict=True)) for name in DEMO_VALUES]
    combinations = []
    for picks in product(*axes):
        (_, (platform, _)), (_, (placement, _)) = picks[PLATFORM_AXIS], picks[PLACEMENT_AXIS]
        combinations.append(
            Combination(
                keys=",".join(str(row_id) for row_id, _ in picks),
                weight=prod(weight for _, (_, weight) in picks),
                click_rate=PLACEMENT_CTR[placement],
                like_rate=PLATFORM_LIKE_RATE[platform],
                cpm=PLATFORM_CPM[platform],
            )
        )
    return combinations


def demo_day(day: date, rows: int, seed: int, combinations: list[Combination]) -> str:
    """CSV lines (FACT_COLUMNS) of one day: `rows` distinct combinations, the same for the same
    day, size and seed. Clicks never exceed impressions, nor conversions clicks."""
    rng = random.Random(f"{seed}:{day.isoformat()}")  # noqa: S311 - reproducible, not secret
    weekday_factor = 0.85 if day.weekday() >= 5 else 1.0
    date_id = date_id_of(day)
    lines = []
    for index in sorted(rng.sample(range(COMBINATIONS), rows)):
        combination = combinations[index]
        weight = weekday_factor * combination.weight
        impressions = int(BASE_IMPRESSIONS * weight * rng.lognormvariate(0, 0.6)) + 1
        clicks = int(impressions * combination.click_rate * rng.uniform(0.5, 1.5))
        conversions = int(clicks * rng.uniform(0.01, 0.12))
        likes = int(impressions * combination.like_rate * rng.random())
        cents = int(impressions * combination.cpm * rng.uniform(0.7, 1.3) / 10)
        lines.append(
            f"{date_id},{combination.keys},{impressions},{clicks},"
            f"{cents // 100}.{cents % 100:02d},{conversions},{likes}\n"
        )
    return "".join(lines)


@dataclass
class CsvCheck:
    """What a pass over a load-metrics file found: errors, or the values it will need."""

    errors: list[str] = field(default_factory=list)
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
        check.errors += [f"line {number}: {message}" for message in row[: max(room, 0)]]
    return check


def staging_line(number: int, row: MetricsCsvRow, ids: dict[str, dict[str, int]]) -> str:
    """A CSV line for the staging table: line number, FACT_COLUMNS."""
    keys = ",".join(str(ids[name][getattr(row, name).casefold()]) for name in DIMENSIONS)
    measures = ",".join(str(getattr(row, name)) for name in MEASURES)
    return f"{number},{date_id_of(row.date)},{keys},{measures}\n"
