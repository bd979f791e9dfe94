"""What a name may hold: names as people write them (emoji sequences, emoji newer than Python's
Unicode database, joiners in scripts that need them) are taken; invisible, disruptive and
unassigned characters are refused; and the OpenAPI document's pattern says exactly what the
server accepts, as a JavaScript engine (JSON Schema's regular expressions are ECMA-262's) and
Python's `re` read it."""

import json
import random
import re
import subprocess
import unicodedata

import httpx
import pytest
from pydantic import ValidationError

import name_rule
from models import PetCreate
from tests.helpers import assert_problem, create

ACCEPTED = [
    "Rex",
    "🐈‍⬛",  # black cat: cat, ZWJ, black large square
    "🐕‍🦺",  # service dog
    "🐻‍❄️",  # polar bear: ZWJ and a variation selector
    "🏳️‍🌈",
    "👩🏽‍🚀",  # a skin tone in a sequence
    "1️⃣",  # a keycap: digit, VS16, combining enclosing keycap
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿",  # the flag of Scotland: tag characters
    "🪿",  # goose (Unicode 15.0: unassigned to Python 3.11)
    "🫎",  # moose (15.0)
    "\U0001faea",  # an emoji of a Unicode release after 15
    "\U0001fff0",  # reserved by Unicode for future emoji
    "Zoë",
    "Ze\u0301",  # a combining accent
    "مهرداد\u200cی",  # Persian, with the zero-width non-joiner it needs
    "ポチ",
    "  Rex  ",
]
REFUSED = [
    "",
    " ",
    "\u200b",  # zero-width space
    "\u200d",  # a joiner alone
    "\u0301",  # a combining mark alone
    "\u3164",  # Hangul filler
    "\u2800",  # blank Braille pattern
    "\u202egnp.exe",  # right-to-left override
    "Rex\u2066",  # a bidi isolate
    "Rex\u2028Max",  # line separator
    "Rex\u2029",  # paragraph separator
    "Re\tx",
    "Rex\n",
    "Rex\x00",
    "\ue000",  # private use
    "\U000f0000",  # supplementary private use
    "\u0378",  # unassigned, and not reserved for emoji
    "a\U000e0000",  # unassigned in the tags block
    "\ufdd0",  # a noncharacter
    "\ufeffRex",  # byte order mark
    "Rex\u00ad",  # soft hyphen
    "x" * 101,
]


def server_accepts(name: str) -> bool:
    try:
        PetCreate(name=name, pet_type="cat")
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("name", ACCEPTED)
async def test_names_people_write_are_taken(
    client: httpx.AsyncClient, auth_headers: dict[str, str], name: str
) -> None:
    pet = await create(client, auth_headers, name=name, pet_type="cat")
    assert pet["name"] == name.strip()
    assert (await client.get(f"/pets/{pet['id']}")).json()["name"] == name.strip()


@pytest.mark.parametrize("name", REFUSED)
async def test_invisible_disruptive_and_unassigned_characters_are_refused(
    client: httpx.AsyncClient, auth_headers: dict[str, str], name: str
) -> None:
    body = {"name": name, "pet_type": "cat"}
    problem = assert_problem(await client.post("/pets", json=body, headers=auth_headers), 422)
    assert [e["loc"] for e in problem["errors"]] == [["body", "name"]]


def test_the_rule_does_not_depend_on_pythons_unicode_database() -> None:
    # Python 3.11's own database calls the goose unassigned; the rule takes it.
    assert unicodedata.unidata_version < "15.0"
    assert unicodedata.category("🪿") == "Cn"
    assert name_rule.name_problem("🪿") is None


def generated_names(count: int, seed: int = 20261205) -> list[str]:
    """Names of 1 to 6 characters drawn from everywhere: any code point, the emoji blocks, the
    characters sequences are made of, letters and spaces."""
    pick = random.Random(seed)  # noqa: S311 (repeatable test data, not secrets)
    pools = [
        lambda: pick.randrange(0x110000),
        lambda: pick.randrange(0x1F000, 0x20000),
        lambda: pick.choice([0x200C, 0x200D, 0xFE0F, 0x20E3, 0x1F3FB, 0xE0067, 0xE007F, 0x301]),
        lambda: pick.choice([0x20, 0x3000, 0x2028, 0x202E, 0x200B, 0x9, 0x0, 0xAD, 0x3164]),
        lambda: pick.randrange(0x20, 0x250),
    ]
    names = []
    for _ in range(count):
        points = [pick.choice(pools)() for _ in range(pick.randint(1, 6))]
        names.append("".join(chr(p) for p in points if not 0xD800 <= p <= 0xDFFF) or "x")
    return names


def ecma_verdicts(pattern: str, names: list[str]) -> list[bool]:
    """Whether each name matches `pattern` as JSON Schema validators in JavaScript read it
    (ECMA-262, the `u` flag)."""
    script = (
        "const [pattern, names] = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "const re = new RegExp(pattern, 'u');"
        "process.stdout.write(JSON.stringify(names.map((n) => re.test(n))));"
    )
    result = subprocess.run(
        ["node", "-e", script],
        input=json.dumps([pattern, names]),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    verdicts: list[bool] = json.loads(result.stdout)
    return verdicts


async def test_the_openapi_pattern_says_exactly_what_the_server_takes(
    client: httpx.AsyncClient,
) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    pattern = schemas["Name"]["pattern"]
    assert schemas["PetCreate"]["properties"]["name"]["allOf"] == [
        {"$ref": "#/components/schemas/Name"}
    ]
    names = [*ACCEPTED, *REFUSED, *generated_names(4000)]
    names = [n for n in names if 1 <= len(n) <= 100]  # minLength and maxLength say the rest
    server = [server_accepts(name) for name in names]
    python = [re.fullmatch(pattern, name) is not None for name in names]
    javascript = ecma_verdicts(pattern, names)
    for name, by_server, by_python, by_js in zip(names, server, python, javascript, strict=True):
        assert by_server == by_python == by_js, (ascii(name), by_server, by_python, by_js)
    assert 500 < sum(server) < len(names) - 500  # both verdicts are well represented
    # And a filter value is the same rule, through the API.
    for name in names[:60]:
        response = await client.get("/pets", params={"name": name})
        assert (response.status_code == 200) == server_accepts(name), ascii(name)
