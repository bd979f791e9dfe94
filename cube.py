"""The cubes' arithmetic: facts (numpy arrays) summed into every set of dimensions the daily and
monthly cubes hold, exactly, in 64-bit integers; and the binary COPY formats of the facts read
and of the cube rows written.

PostgreSQL sums at a few hundred nanoseconds per fact and set, which makes the forty-odd sets of
ten million facts take minutes; summing arrays takes seconds. Each set is summed from the
smallest set already summed that contains it (a triple from a five-dimension helper, a pair from
a triple, a month from its days), as cube builders do."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from models import (
    ALL_DIMENSIONS,
    CUBE_MAX_DIMENSIONS,
    DAILY_CUBE_SETS,
    DIMENSIONS,
    MEASURES,
    MONTHLY_CUBE_SETS,
    dimension_mask,
    dimensions_of,
)

Array: TypeAlias = npt.NDArray[np.int64]

# Sets summed from the facts first, only to sum the daily sets from: each is several times
# smaller than the facts, and together they contain every set of three dimensions.
HELPER_SETS = (
    ALL_DIMENSIONS & ~dimension_mask(["region"]),
    ALL_DIMENSIONS & ~dimension_mask(["placement"]),
    dimension_mask(["region", "placement", "age_group", "device_type"]),
    dimension_mask(["region", "placement", "gender", "platform"]),
)
# Below this bound every partial sum is exact in a float64, so numpy's bincount may add them.
EXACT_IN_FLOAT = 2**53
INT64_LIMIT = 2**63
# A float sum this close to the limit may hide an exact one past it.
NEAR_INT64_LIMIT = INT64_LIMIT * (1 - 1e-9)


class CubeOverflow(ValueError):
    """A sum that the cubes' 64-bit integers cannot hold."""


@dataclass(frozen=True)
class Cells:
    """Rows of one set of dimensions at one grain: the period (date_id YYYYMMDD, or month_id
    YYYYMM when monthly), the ids of the set's dimensions (DIMENSIONS order), the sums of the
    measures (MEASURES order, cost in cents), and how many facts each row sums."""

    mask: int
    monthly: bool
    period: Array
    keys: Array  # (rows, dimensions in the set)
    sums: Array  # (rows, measures)
    facts: Array

    def __len__(self) -> int:
        return len(self.period)


def facts_cells(period: Array, dimensions: Array, measures: Array) -> Cells:
    """The facts as the daily rows of all six dimensions: each fact is one row."""
    ones = np.ones(len(period), dtype=np.int64)
    return Cells(ALL_DIMENSIONS, False, period, dimensions, measures, ones)


def dense(values: Array) -> tuple[Array, Array]:
    """Each value's position among the distinct values, and those values in order."""
    if len(values) == 0:
        return values.copy(), values.copy()
    low = int(values.min())
    span = int(values.max()) - low + 1
    if span <= max(4 * len(values), 1 << 16):  # small integers (ids, days): a lookup, no sort
        offsets = values - low
        present = np.bincount(offsets, minlength=span) > 0
        return (np.cumsum(present) - 1)[offsets], np.flatnonzero(present) + low
    distinct, index = np.unique(values, return_inverse=True)
    return index.astype(np.int64), distinct.astype(np.int64)


def add_up(group: Array, groups: int, values: Array) -> Array:
    """Per group, the sum of its rows' `values`, exactly."""
    approximate = np.bincount(group, weights=values, minlength=groups)
    if (int(values.max()) if len(values) else 0) * len(values) < EXACT_IN_FLOAT:
        return np.rint(approximate).astype(np.int64)  # every partial sum was exact
    if len(approximate) and approximate.max() >= NEAR_INT64_LIMIT:
        raise CubeOverflow(
            f"a month's sum of a measure would exceed {INT64_LIMIT - 1} (the largest 64-bit"
            " integer), which the cubes cannot hold; load such facts in separate months"
        )
    sums = np.zeros(groups, dtype=np.int64)
    np.add.at(sums, group, values)
    return sums


@dataclass(frozen=True)
class Grouping:
    """Rows numbered by the combination of their indexes: each row's group number, how many
    numbers there are, the numbers that occur, and each of those as its indexes."""

    group: Array
    groups: int
    present: Array
    combinations: Array  # (present, columns)


def group_rows(indexes: Sequence[Array], sizes: Sequence[int]) -> Grouping:
    """Number the rows by their combination of indexes (each index below its size): densely when
    the combinations are few enough to count them all, else by numbering those that occur."""
    rows = len(indexes[0])
    space = 1
    for size in sizes:
        space *= size
    if space >= INT64_LIMIT // 4:  # too many combinations for one integer key
        combinations, inverse = np.unique(np.stack(indexes, axis=1), axis=0, return_inverse=True)
        count = len(combinations)
        return Grouping(inverse.reshape(-1).astype(np.int64), count, np.arange(count), combinations)
    key = np.zeros(rows, dtype=np.int64)
    for index, size in zip(indexes, sizes, strict=True):
        key = key * size + index
    if space <= max(2 * rows, 1 << 20):
        present = np.flatnonzero(np.bincount(key, minlength=space))
        group, groups = key, space
        keys = present
    else:
        keys, inverse = np.unique(key, return_inverse=True)
        group, groups = inverse.astype(np.int64), len(keys)
        present = np.arange(groups)
    combinations = np.empty((len(keys), len(sizes)), dtype=np.int64)
    rest = keys
    for column in range(len(sizes) - 1, -1, -1):
        rest, combinations[:, column] = np.divmod(rest, sizes[column])
    return Grouping(group, groups, present, combinations)


def roll_up(parent: Cells, mask: int, monthly: bool) -> Cells:
    """`parent`'s rows summed into the set `mask` (within the parent's), per day or per month."""
    kept = [dimensions_of(parent.mask).index(name) for name in dimensions_of(mask)]
    period = parent.period // 100 if monthly and not parent.monthly else parent.period
    columns = [period, *(parent.keys[:, column] for column in kept)]
    indexes, distinct = zip(*(dense(column) for column in columns), strict=True)
    grouping = group_rows(indexes, [len(values) for values in distinct])

    def summed(values: Array) -> Array:
        return add_up(grouping.group, grouping.groups, values)[grouping.present]

    values = [distinct[n][grouping.combinations[:, n]] for n in range(len(columns))]
    keys = np.stack(values[1:], axis=1) if kept else np.zeros((len(values[0]), 0), np.int64)
    sums = np.stack([summed(parent.sums[:, m]) for m in range(len(MEASURES))], axis=1)
    return Cells(mask, monthly, values[0], keys, sums, summed(parent.facts))


def sum_cubes(facts: Cells) -> tuple[list[Cells], list[Cells]]:
    """Every daily and every monthly set of the cubes, summed from the facts (whole months of
    them: a month's row sums all of its days)."""
    daily: dict[int, Cells] = {ALL_DIMENSIONS: facts}
    monthly: dict[int, Cells] = {}
    for mask in (*HELPER_SETS, *sorted(DAILY_CUBE_SETS, key=lambda m: -m.bit_count())):
        daily[mask] = roll_up(_smallest_within(daily.values(), mask), mask, monthly=False)
    for mask in sorted(MONTHLY_CUBE_SETS, key=lambda m: -m.bit_count()):
        parents = [*daily.values(), *monthly.values()]
        monthly[mask] = roll_up(_smallest_within(parents, mask), mask, monthly=True)
    return [daily[mask] for mask in DAILY_CUBE_SETS], [monthly[m] for m in MONTHLY_CUBE_SETS]


def _smallest_within(candidates: Iterable[Cells], mask: int) -> Cells:
    """The candidate with the fewest rows among those whose set contains `mask`."""
    return min((c for c in candidates if c.mask & mask == mask), key=len)


# --- the binary COPY format --------------------------------------------------------------------

COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
COPY_TRAILER = b"\xff\xff"


# A numeric(p, 2) field below 10**12, written as PostgreSQL's binary numeric: four base-10,000
# digits (the first of them 10**8), weight 2, scale 2. PostgreSQL strips the zero digits.
CENTS = "cents"
NUMERIC = np.dtype(
    [("ndigits", ">i2"), ("weight", ">i2"), ("sign", ">u2"), ("dscale", ">i2"),
     ("digits", ">i2", (4,))]
)  # fmt: skip
CENTS_LIMIT = 10**14


def copy_row_type(fields: Sequence[str]) -> np.dtype[np.void]:
    """One row of a binary COPY of these big-endian fields (">i2", ">i4", ">i8", or CENTS): its
    field count, then each field's length and value."""
    columns: list[tuple[str, object]] = [("count", ">i2")]
    columns += [
        (f"f{n}", [("length", ">i4"), ("value", NUMERIC if kind == CENTS else kind)])
        for n, kind in enumerate(fields)
    ]
    return np.dtype(columns)


def read_copy(data: bytes, fields: Sequence[str]) -> list[Array]:
    """The columns of a binary COPY of fixed-width integer fields, as int64 arrays."""
    row = copy_row_type(fields)
    body = np.frombuffer(data, dtype=np.uint8, offset=len(COPY_SIGNATURE))
    rows = body[: len(body) - len(COPY_TRAILER)].view(row)
    return [rows[f"f{n}"]["value"].astype(np.int64) for n in range(len(fields))]


def binary_copy_rows(columns: Sequence[Array], fields: Sequence[str]) -> bytes:
    """The rows of a binary COPY (no signature, no trailer) of these int64 columns as the given
    fields; a CENTS column holds cents, 0 up to CENTS_LIMIT."""
    row = copy_row_type(fields)
    rows = np.empty(len(columns[0]) if columns else 0, dtype=row)
    rows["count"] = len(fields)
    for n, (column, kind) in enumerate(zip(columns, fields, strict=True)):
        field = rows[f"f{n}"]
        if kind == CENTS:
            field["length"] = NUMERIC.itemsize
            value = field["value"]
            value["ndigits"], value["weight"], value["sign"], value["dscale"] = 4, 2, 0, 2
            units, cents = np.divmod(column, 100)
            value["digits"] = np.stack(
                [units // 10**8, units // 10**4 % 10**4, units % 10**4, cents * 100], axis=1
            )
        else:
            field["length"] = np.dtype(kind).itemsize
            field["value"] = column
    return rows.tobytes()


def write_copy(columns: Sequence[Array], fields: Sequence[str]) -> bytes:
    """A binary COPY of these int64 columns as the given fields (see binary_copy_rows)."""
    return COPY_SIGNATURE + binary_copy_rows(columns, fields) + COPY_TRAILER


def cube_columns(cells: Cells, key_count: int) -> list[Array]:
    """The columns of the cube rows of `cells`: set_id, period, k1..k<key_count> (0 past the
    set's dimensions), then the measures."""
    rows = len(cells)
    keys = [cells.keys[:, n] if n < cells.keys.shape[1] else np.zeros(rows, np.int64)
            for n in range(key_count)]  # fmt: skip
    set_ids = np.full(rows, cells.mask, dtype=np.int64)
    return [set_ids, cells.period, *keys, *(cells.sums[:, m] for m in range(len(MEASURES)))]


DAILY_FIELDS = (">i2", ">i4", *(">i4",) * CUBE_MAX_DIMENSIONS, *(">i8",) * len(MEASURES))
MONTHLY_FIELDS = (">i2", ">i4", *(">i4",) * len(DIMENSIONS), *(">i8",) * len(MEASURES))


def cube_copies(fact_cells: bytes, fields: Sequence[str]) -> tuple[bytes, bytes]:
    """From a binary COPY of facts (date_id, the six dimension ids, the measures with cost in
    cents; of these `fields`), binary COPYs of their daily and monthly cube rows."""
    return cube_copies_of(read_copy(fact_cells, fields))


def cube_copies_of(columns: Sequence[Array]) -> tuple[bytes, bytes]:
    """Binary COPYs of the daily and monthly cube rows of facts given as columns (date_id, the
    six dimension ids, the measures with cost in cents)."""
    if len(columns[0]) == 0:
        return write_copy([], ()), write_copy([], ())
    period, dimensions = columns[0], np.stack(columns[1 : 1 + len(DIMENSIONS)], axis=1)
    measures = np.stack(columns[1 + len(DIMENSIONS) :], axis=1)
    daily, monthly = sum_cubes(facts_cells(period, dimensions, measures))

    def copy(cells: list[Cells], key_count: int, fields: Sequence[str]) -> bytes:
        parts = [cube_columns(c, key_count) for c in cells]
        return write_copy([np.concatenate(column) for column in zip(*parts, strict=True)], fields)

    return (
        copy(daily, CUBE_MAX_DIMENSIONS, DAILY_FIELDS),
        copy(monthly, len(DIMENSIONS), MONTHLY_FIELDS),
    )
