"""Every query of the service, as plain async functions over a session."""

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, func, text
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, delete, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from errors import NotFound
from models import Pet, PetCreate, PetQuery, PetTypeStats, PetUpdate, User


def _pet_filters(query: PetQuery) -> list[ColumnElement[bool]]:
    filters: list[ColumnElement[bool]] = []
    if query.pet_type is not None:
        filters.append(col(Pet.pet_type) == query.pet_type)
    if query.name is not None:
        filters.append(col(Pet.name).icontains(query.name, autoescape=True))
    return filters


async def list_pets(session: AsyncSession, query: PetQuery) -> tuple[Sequence[Pet], int]:
    """One page of pets matching the query, and how many match in all."""
    filters = _pet_filters(query)
    column = col(getattr(Pet, query.sort.removeprefix("-")))
    order = column.desc() if query.sort.startswith("-") else column.asc()
    page = await session.exec(
        select(Pet)
        .where(*filters)
        .order_by(order, col(Pet.id).asc())
        .limit(query.limit)
        .offset(query.offset)
    )
    total = await session.exec(select(func.count()).select_from(Pet).where(*filters))
    return page.all(), total.one()


def _not_found(pet_id: int) -> NotFound:
    return NotFound(f"Pet {pet_id} does not exist.")


async def get_pet(session: AsyncSession, pet_id: int) -> Pet:
    pet = await session.get(Pet, pet_id)
    if pet is None:
        raise _not_found(pet_id)
    return pet


async def create_pet(session: AsyncSession, data: PetCreate) -> Pet:
    result = await session.exec(insert(Pet).values(**data.model_dump()).returning(Pet))
    pet: Pet = result.scalar_one()
    await session.commit()
    return pet


async def _update_pet(session: AsyncSession, pet_id: int, changes: dict[str, Any]) -> Pet:
    # One UPDATE ... RETURNING: no read-modify-write window for concurrent writers.
    result = await session.exec(
        update(Pet)
        .where(col(Pet.id) == pet_id)
        .values(**changes)
        .returning(Pet)
        .execution_options(synchronize_session=False)
    )
    pet: Pet | None = result.scalar_one_or_none()
    if pet is None:
        raise _not_found(pet_id)
    await session.commit()
    return pet


async def replace_pet(session: AsyncSession, pet_id: int, data: PetCreate) -> Pet:
    return await _update_pet(session, pet_id, data.model_dump())


async def patch_pet(session: AsyncSession, pet_id: int, data: PetUpdate) -> Pet:
    changes = data.model_dump(exclude_unset=True)
    if not changes:
        return await get_pet(session, pet_id)
    return await _update_pet(session, pet_id, changes)


async def delete_pet(session: AsyncSession, pet_id: int) -> None:
    result = await session.exec(delete(Pet).where(col(Pet.id) == pet_id).returning(col(Pet.id)))
    if result.scalar_one_or_none() is None:
        raise _not_found(pet_id)
    await session.commit()


async def pet_type_stats(session: AsyncSession) -> list[PetTypeStats]:
    """Count, largest id and longest name per pet type, ordered by type."""
    result = await session.exec(
        select(
            col(Pet.pet_type),
            func.count().label("count"),
            func.max(col(Pet.id)).label("max_id"),
            func.max(func.char_length(col(Pet.name))).label("longest_name"),
        )
        .group_by(col(Pet.pet_type))
        .order_by(col(Pet.pet_type))
    )
    return [PetTypeStats.model_validate(row, from_attributes=True) for row in result.all()]


# (id, name, pet_type, created_at); the table model types id and created_at as optional.
PetRow = Row[int | None, str, str, datetime | None]


async def stream_pets(session: AsyncSession) -> AsyncIterator[PetRow]:
    """Every pet by id, fetched in batches through a server-side cursor (memory stays flat)."""
    result = await session.stream(
        select(col(Pet.id), col(Pet.name), col(Pet.pet_type), col(Pet.created_at))
        .order_by(col(Pet.id))
        .execution_options(yield_per=2000)
    )
    async for row in result:
        yield row


async def ping(session: AsyncSession) -> None:
    """A round trip to the database; raises when it cannot be reached."""
    await session.exec(text("SELECT 1"))  # type: ignore[call-overload]


async def get_user(session: AsyncSession, user_id: int) -> User | None:
    return await session.get(User, user_id)


async def get_user_by_username(session: AsyncSession, username: str) -> User | None:
    result = await session.exec(select(User).where(col(User.username) == username))
    return result.one_or_none()


async def add_user_if_missing(
    session: AsyncSession, username: str, password_hash: str
) -> User | None:
    """Insert a user; None when the name is taken (an existing user is never overwritten)."""
    result = await session.exec(
        insert(User)
        .values(username=username, password_hash=password_hash)
        .on_conflict_do_nothing(index_elements=[col(User.username)])
        .returning(User)
    )
    user: User | None = result.scalar_one_or_none()
    await session.commit()
    return user
