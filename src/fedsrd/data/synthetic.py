"""Synthetic instruction domains with short, verifiable answers, deterministic by seed in any process.

:func:`synthetic_domain` draws one domain's split, :func:`load_synthetic` train/test splits of several. Every example
has the string columns ``instruction``, ``input``, ``output`` and ``domain``; the splits never share a question.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction

import datasets

SYNTHETIC_DOMAINS: tuple[str, ...] = ("arithmetic", "code_output", "percent", "units")

_SYNTHETIC_COLUMNS = ("instruction", "input", "output", "domain")
_SYNTHETIC_SPLITS = ("train", "validation", "test")


_Question = tuple[str, str]  # (question text, answer)
_Template = Callable[[random.Random], _Question]


def _stable_int(*parts: object) -> int:
    """A process-independent 64-bit hash (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def _split_of(domain: str, question: str) -> str:
    """Which split owns a question: ~20% test, ~10% validation, the rest train.

    Assigning each question to exactly one split by hashing its text makes train, validation and
    test disjoint by construction, for every seed.
    """
    bucket = _stable_int("split", domain, question) % 10
    if bucket < 2:
        return "test"
    if bucket == 2:
        return "validation"
    return "train"


def _format_number(value: int | Fraction, places: int = 2) -> str:
    """Decimal text of ``value`` rounded half-up to ``places`` decimals, trailing zeros dropped."""
    value = Fraction(value)
    scale = 10**places
    scaled = abs(value) * scale
    rounded = int(scaled + Fraction(1, 2))  # half-up on the magnitude
    sign = "-" if value < 0 and rounded else ""
    whole, frac = divmod(rounded, scale)
    if frac == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:0{places}d}".rstrip("0")


_NAMES = ("Tom", "Ana", "Ravi", "Mei", "Lucas", "Fatima", "Omar", "Sofia", "Kenji", "Zoe", "Priya",
          "Diego", "Nina", "Sam")
_ITEMS = ("apple", "marble", "book", "pencil", "sticker", "cookie", "stamp", "shell", "card",
          "orange", "balloon", "coin")
_WORDS = ("apple", "banana", "cherry", "delta", "engine", "forest", "garden", "harbor", "island",
          "jungle", "kernel", "lemon", "magnet", "number", "orbit", "python", "quartz", "river",
          "silver", "tensor", "umbrella", "violet", "window", "yellow", "zebra", "lambda", "matrix",
          "vector", "server", "client", "gradient", "module")
_VAR_NAMES = ("x", "y", "n", "a", "b", "val", "count", "k", "m", "total_a")


# --- arithmetic word problems ---------------------------------------------------------------


def _arith_add(rng: random.Random) -> _Question:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return (f"{name} has {a} {item}s and buys {b} more. How many {item}s does {name} have now?",
            str(a + b))


def _arith_sub(rng: random.Random) -> _Question:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a = rng.randint(20, 199)
    b = rng.randint(1, a - 1)
    return (f"{name} had {a} {item}s and gave {b} of them away. "
            f"How many {item}s does {name} have left?", str(a - b))


def _arith_mul(rng: random.Random) -> _Question:
    item = rng.choice(_ITEMS)
    boxes, per_box = rng.randint(2, 25), rng.randint(2, 25)
    return (f"There are {boxes} boxes with {per_box} {item}s in each box. "
            f"How many {item}s are there in total?", str(boxes * per_box))


def _arith_div(rng: random.Random) -> _Question:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    friends, each = rng.randint(2, 12), rng.randint(2, 30)
    return (f"{name} shares {friends * each} {item}s equally among {friends} friends. "
            f"How many {item}s does each friend get?", str(each))


def _arith_change(rng: random.Random) -> _Question:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    count, price = rng.randint(2, 9), rng.randint(1, 12)
    bill = rng.choice([b for b in (20, 50, 100, 200) if b > count * price])
    return (f"{name} buys {count} {item}s at {price} dollars each and pays with a {bill}-dollar "
            f"bill. How much change, in dollars, does {name} get?", str(bill - count * price))


def _arith_two_step(rng: random.Random) -> _Question:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(10, 99), rng.randint(2, 50)
    c = rng.randint(1, a + b - 1)
    return (f"{name} has {a} {item}s, buys {b} more, and then gives {c} to a friend. "
            f"How many {item}s does {name} have now?", str(a + b - c))


def _arith_distance(rng: random.Random) -> _Question:
    speed, hours = rng.randint(20, 120), rng.randint(2, 9)
    vehicle = rng.choice(("train", "car", "bus", "truck"))
    return (f"A {vehicle} travels at {speed} kilometres per hour for {hours} hours. "
            f"How many kilometres does it travel?", str(speed * hours))


# --- predict the output of a Python snippet -------------------------------------------------
# Answers are computed from the template parameters; the snippet text is never executed.

_EXPRESSIONS: tuple[tuple[str, Callable[[int, int, int], int]], ...] = (
    ("{v1} * {v2} + {c}", lambda a, b, c: a * b + c),
    ("{v1} + {v2} * {c}", lambda a, b, c: a + b * c),
    ("({v1} + {v2}) * {c}", lambda a, b, c: (a + b) * c),
    ("{v1} - {v2} + {c}", lambda a, b, c: a - b + c),
    ("{v1} * {c} - {v2}", lambda a, b, c: a * c - b),
)


def _code_expression(rng: random.Random) -> _Question:
    v1, v2 = rng.sample(_VAR_NAMES, 2)
    a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 9)
    expression, value = rng.choice(_EXPRESSIONS)
    code = f"{v1} = {a}\n{v2} = {b}\nprint({expression.format(v1=v1, v2=v2, c=c)})"
    return code, str(value(a, b, c))


def _code_loop_sum(rng: random.Random) -> _Question:
    start, stop, step = rng.randint(0, 5), rng.randint(6, 15), rng.randint(1, 3)
    factor = rng.randint(1, 9)
    code = (f"total = 0\nfor i in range({start}, {stop}, {step}):\n    total += i * {factor}\n"
            "print(total)")
    return code, str(factor * sum(range(start, stop, step)))


def _code_filtered_sum(rng: random.Random) -> _Question:
    nums = [rng.randint(1, 30) for _ in range(rng.randint(4, 7))]
    kind = rng.choice(("even", "odd", "greater"))
    if kind == "even":
        condition, kept = "n % 2 == 0", [n for n in nums if n % 2 == 0]
    elif kind == "odd":
        condition, kept = "n % 2 == 1", [n for n in nums if n % 2 == 1]
    else:
        threshold = rng.randint(5, 25)
        condition, kept = f"n > {threshold}", [n for n in nums if n > threshold]
    code = f"nums = {nums}\nprint(sum(n for n in nums if {condition}))"
    return code, str(sum(kept))


def _code_reverse(rng: random.Random) -> _Question:
    word = rng.choice(_WORDS)
    if rng.random() < 0.5:
        return f's = "{word}"\nprint(s[::-1])', word[::-1]
    count = rng.randint(2, 4)
    return f's = "{word}"\nprint(s[::-1][:{count}])', word[::-1][:count]


def _code_range_of_list(rng: random.Random) -> _Question:
    nums = [rng.randint(-20, 60) for _ in range(rng.randint(3, 7))]
    return f"nums = {nums}\nprint(max(nums) - min(nums))", str(max(nums) - min(nums))


def _code_len_repeat(rng: random.Random) -> _Question:
    word, times = rng.choice(_WORDS), rng.randint(2, 9)
    return f'word = "{word}"\nprint(len(word * {times}))', str(len(word) * times)


def _code_divmod(rng: random.Random) -> _Question:
    a, b = rng.randint(10, 200), rng.randint(2, 12)
    return f"print({a} // {b}, {a} % {b})", f"{a // b} {a % b}"


def _code_upper_slice(rng: random.Random) -> _Question:
    word, count = rng.choice(_WORDS), rng.randint(2, 5)
    return f's = "{word}"\nprint(s.upper()[:{count}])', word.upper()[:count]


def _code_branch(rng: random.Random) -> _Question:
    x, modulus = rng.randint(10, 99), rng.randint(2, 7)
    code = (f"x = {x}\nif x % {modulus} == 0:\n    print(\"divisible\")\nelse:\n"
            f"    print(x % {modulus})")
    return code, "divisible" if x % modulus == 0 else str(x % modulus)


def _code_index(rng: random.Random) -> _Question:
    items = rng.sample(_WORDS, rng.randint(3, 6))
    index = rng.randint(-len(items), len(items) - 1)
    return f"items = {items!r}\nprint(items[{index}])", items[index]


def _code_halving(rng: random.Random) -> _Question:
    n = rng.randint(2, 5000)
    steps, value = 0, n
    while value > 1:
        value //= 2
        steps += 1
    code = f"n = {n}\nsteps = 0\nwhile n > 1:\n    n //= 2\n    steps += 1\nprint(steps)"
    return code, str(steps)


def _code_count(rng: random.Random) -> _Question:
    word = rng.choice(_WORDS)
    letter = rng.choice(sorted(set(word)) + ["e", "a"])
    return f's = "{word}"\nprint(s.count("{letter}"))', str(word.count(letter))


# --- percentages and interest -----------------------------------------------------------------


def _pct_of(rng: random.Random) -> _Question:
    pct = rng.choice((5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75, 80, 120, 150))
    base = 10 * rng.randint(1, 100)
    return f"What is {pct}% of {base}?", _format_number(Fraction(pct * base, 100))


def _pct_discount(rng: random.Random) -> _Question:
    item = rng.choice(("jacket", "lamp", "bicycle", "printer", "chair", "backpack", "watch"))
    price, off = rng.randint(10, 500), 5 * rng.randint(1, 12)
    return (f"A {item} costs {price} dollars and is discounted by {off}%. "
            f"What is the sale price in dollars?", _format_number(Fraction(price * (100 - off), 100)))


def _pct_simple_interest(rng: random.Random) -> _Question:
    principal, rate, years = 100 * rng.randint(1, 50), rng.randint(1, 12), rng.randint(1, 10)
    return (f"{principal} dollars is invested at {rate}% simple annual interest. "
            f"How much interest, in dollars, is earned after {years} years?",
            _format_number(Fraction(principal * rate * years, 100)))


def _pct_compound(rng: random.Random) -> _Question:
    principal, rate, years = 100 * rng.randint(1, 100), rng.randint(1, 10), rng.randint(2, 5)
    balance = principal * Fraction(100 + rate, 100) ** years
    return (f"{principal} dollars is deposited at {rate}% interest compounded annually. "
            f"What is the balance in dollars after {years} years? Round to two decimal places.",
            _format_number(balance))


def _pct_share(rng: random.Random) -> _Question:
    total = rng.choice((4, 5, 8, 10, 20, 25, 40, 50, 80, 100, 125, 200, 250, 400, 500))
    part = rng.randint(1, total)
    group = rng.choice(("students", "runners", "applicants", "players"))
    return (f"{part} out of {total} {group} passed the test. What percentage passed?",
            _format_number(Fraction(100 * part, total)))


def _pct_change(rng: random.Random) -> _Question:
    item = rng.choice(("ticket", "book", "coffee", "train pass", "game"))
    old = rng.choice((20, 25, 40, 50, 80, 100, 200, 250, 400, 500))
    pct = rng.randint(1, 90)
    if rng.random() < 0.5:
        new = Fraction(old * (100 + pct), 100)
        verb, noun = "rose", "increase"
    else:
        new = Fraction(old * (100 - pct), 100)
        verb, noun = "fell", "decrease"
    return (f"The price of a {item} {verb} from {old} to {_format_number(new)} dollars. "
            f"What was the percentage {noun}?", str(pct))


def _pct_reverse(rng: random.Random) -> _Question:
    old, pct = 100 * rng.randint(10, 90), rng.choice((2, 4, 5, 8, 10, 12, 15, 20, 25))
    new = Fraction(old * (100 + pct), 100)
    return (f"After a {pct}% raise, a monthly salary is {_format_number(new)} dollars. "
            f"What was the salary, in dollars, before the raise?", str(old))


# --- unit and dose conversions ----------------------------------------------------------------

_CONVERSIONS: tuple[tuple[str, str, Fraction], ...] = (  # (from unit, to unit, factor)
    ("kilometres", "metres", Fraction(1000)),
    ("metres", "centimetres", Fraction(100)),
    ("kilograms", "grams", Fraction(1000)),
    ("grams", "milligrams", Fraction(1000)),
    ("milligrams", "micrograms", Fraction(1000)),
    ("litres", "millilitres", Fraction(1000)),
    ("hours", "minutes", Fraction(60)),
    ("minutes", "seconds", Fraction(60)),
    ("days", "hours", Fraction(24)),
    ("feet", "inches", Fraction(12)),
    ("inches", "centimetres", Fraction(254, 100)),
    ("pounds", "ounces", Fraction(16)),
    ("miles", "feet", Fraction(5280)),
)


def _unit_linear(rng: random.Random) -> _Question:
    source, target, factor = rng.choice(_CONVERSIONS)
    if rng.random() < 0.5:  # forward: integer or one-decimal value
        value = Fraction(rng.randint(1, 400), rng.choice((1, 1, 2, 10)))
    else:  # backward: pick the answer first so it has at most two decimals
        source, target, factor = target, source, 1 / factor
        value = Fraction(rng.randint(1, 4000), 100) / factor
    question = rng.choice((
        "Convert {v} {s} to {t}.",
        "How many {t} are in {v} {s}?",
        "Express {v} {s} in {t}.",
    ))
    # Every factor is a terminating decimal, so six places show both numbers exactly.
    return (question.format(v=_format_number(value, 6), s=source, t=target),
            _format_number(value * factor, 6))


def _unit_temperature(rng: random.Random) -> _Question:
    if rng.random() < 0.5:
        celsius = 5 * rng.randint(-8, 40)
        return (f"Convert {celsius} degrees Celsius to degrees Fahrenheit.",
                _format_number(Fraction(celsius * 9, 5) + 32))
    fahrenheit = 32 + 9 * rng.randint(-8, 25)
    return (f"Convert {fahrenheit} degrees Fahrenheit to degrees Celsius.",
            _format_number(Fraction((fahrenheit - 32) * 5, 9)))


def _unit_weight_dose(rng: random.Random) -> _Question:
    weight = rng.randint(3, 120)
    per_kg = Fraction(rng.choice((1, 2, 3, 4, 5, 10, 20, 30)), 2)
    return (f"A patient weighs {weight} kg and is prescribed {_format_number(per_kg)} mg/kg of a "
            f"drug. What is the total dose in mg?", _format_number(weight * per_kg))


def _unit_volume_dose(rng: random.Random) -> _Question:
    concentration = rng.choice((2, 5, 10, 20, 25, 40, 50, 100))
    volume = Fraction(rng.randint(1, 40), 2)
    dose = concentration * volume
    return (f"A solution contains {concentration} mg of drug per mL. How many mL are needed for "
            f"a {_format_number(dose)} mg dose?", _format_number(volume))


def _unit_infusion(rng: random.Random) -> _Question:
    rate, hours = 5 * rng.randint(5, 50), rng.randint(1, 12)
    return (f"{rate * hours} mL of fluid must be infused over {hours} hours. "
            f"What is the infusion rate in mL per hour?", str(rate))


def _unit_tablets(rng: random.Random) -> _Question:
    strength = Fraction(rng.choice((10, 20, 25, 50, 100, 200, 500, 1000)), 2)
    tablets = Fraction(rng.choice((1, 2, 3, 4, 5, 6, 8)), 2)
    return (f"A dose of {_format_number(strength * tablets)} mg is ordered and each tablet "
            f"contains {_format_number(strength)} mg. How many tablets should be given?",
            _format_number(tablets))


def _unit_speed(rng: random.Random) -> _Question:
    speed_ms = rng.randint(1, 80)
    speed_kmh = _format_number(Fraction(speed_ms * 18, 5))  # 1 m/s = 3.6 km/h
    if rng.random() < 0.5:
        return f"Convert a speed of {speed_kmh} km/h to metres per second.", str(speed_ms)
    return f"Convert a speed of {speed_ms} metres per second to km/h.", speed_kmh


@dataclass(frozen=True)


class _DomainSpec:
    """How a domain draws questions and phrases them as (instruction, input)."""

    templates: tuple[_Template, ...]
    instructions: tuple[str, ...]  # used with the question as ``input``
    inline_suffix: str | None  # if set, half the time the question is the instruction itself


_NUMBER_INSTRUCTIONS = (
    "Solve the following problem. Answer with a number only.",
    "Read the problem and give the final answer as a single number.",
    "Answer the question below. Reply with just the number.",
)

_DOMAINS: dict[str, _DomainSpec] = {
    "arithmetic": _DomainSpec(
        templates=(_arith_add, _arith_sub, _arith_mul, _arith_div, _arith_change,
                   _arith_two_step, _arith_distance),
        instructions=_NUMBER_INSTRUCTIONS,
        inline_suffix=" Answer with a number only.",
    ),
    "code_output": _DomainSpec(
        templates=(_code_expression, _code_loop_sum, _code_filtered_sum, _code_reverse,
                   _code_range_of_list, _code_len_repeat, _code_divmod, _code_upper_slice,
                   _code_branch, _code_index, _code_halving, _code_count),
        instructions=(
            "What does the following Python code print? Reply with the exact output only.",
            "Predict the output of this Python snippet. Give only the printed text.",
            "Give the exact text printed by this Python program.",
        ),
        inline_suffix=None,
    ),
    "percent": _DomainSpec(
        templates=(_pct_of, _pct_discount, _pct_simple_interest, _pct_compound, _pct_share,
                   _pct_change, _pct_reverse),
        instructions=_NUMBER_INSTRUCTIONS,
        inline_suffix=" Answer with a number only.",
    ),
    "units": _DomainSpec(
        templates=(_unit_linear, _unit_temperature, _unit_weight_dose, _unit_volume_dose,
                   _unit_infusion, _unit_tablets, _unit_speed),
        instructions=(
            "Do the unit or dose calculation below. Answer with a number only.",
            "Solve this conversion problem and reply with just the number.",
            "Compute the requested quantity. Give the number without units.",
        ),
        inline_suffix=" Answer with a number only, without units.",
    ),
}


def _synthetic_features() -> datasets.Features:
    return datasets.Features({column: datasets.Value("string") for column in _SYNTHETIC_COLUMNS})


def synthetic_domain(domain: str, num_examples: int, *, seed: int = 0,
                     split: str = "train") -> datasets.Dataset:
    """Generate ``num_examples`` instruction examples with short, verifiable answers.

    Args:
        domain: One of :data:`SYNTHETIC_DOMAINS` - ``"arithmetic"`` (word problems),
            ``"code_output"`` (predict what a small Python snippet prints), ``"percent"``
            (percentages and interest) or ``"units"`` (unit and dose conversions).
        num_examples: Number of rows (>= 0).
        seed: Seed; the rows are a pure function of ``(domain, seed, split)`` in any process.
        split: ``"train"``, ``"validation"`` or ``"test"``. Every question belongs to exactly one
            split (by a stable hash of its text), so the splits never share an
            ``(instruction, input)`` pair (nor a question), whatever the seeds. Questions are unique
            within a split.

    Returns:
        A dataset with string columns ``instruction``, ``input``, ``output``, ``domain``.
    """
    if domain not in _DOMAINS:
        raise ValueError(f"synthetic_domain: unknown domain {domain!r}; expected one of "
                         f"{list(SYNTHETIC_DOMAINS)}")
    if split not in _SYNTHETIC_SPLITS:
        raise ValueError(f"synthetic_domain: split must be one of {list(_SYNTHETIC_SPLITS)}, "
                         f"got {split!r}")
    if num_examples < 0:
        raise ValueError(f"synthetic_domain: num_examples must be >= 0, got {num_examples}")

    spec = _DOMAINS[domain]
    rng = random.Random(_stable_int("synthetic", domain, seed, split))
    rows: dict[str, list[str]] = {column: [] for column in _SYNTHETIC_COLUMNS}
    seen: set[str] = set()  # questions already used
    max_draws = 100 * num_examples + 1000
    for _ in range(max_draws):
        if len(seen) == num_examples:
            break
        question, answer = rng.choice(spec.templates)(rng)
        if spec.inline_suffix is not None and rng.random() < 0.5:
            instruction, input_text = question + spec.inline_suffix, ""
        else:
            instruction, input_text = rng.choice(spec.instructions), question
        if _split_of(domain, question) != split or question in seen:
            continue
        seen.add(question)
        for column, value in zip(_SYNTHETIC_COLUMNS, (instruction, input_text, answer, domain)):
            rows[column].append(value)
    if len(seen) < num_examples:
        raise ValueError(f"synthetic_domain: could only draw {len(seen)} unique {split!r} examples "
                         f"for domain {domain!r} in {max_draws} draws; ask for fewer than "
                         f"{num_examples}")
    return datasets.Dataset.from_dict(rows, features=_synthetic_features())


def load_synthetic(domains: Iterable[str] = SYNTHETIC_DOMAINS, *, train_size: int = 256,
                   test_size: int = 64, seed: int = 0) -> dict[str, datasets.DatasetDict]:
    """Train/test splits for several synthetic domains, keyed by domain name (in given order)."""
    return {
        domain: datasets.DatasetDict({
            "train": synthetic_domain(domain, train_size, seed=seed, split="train"),
            "test": synthetic_domain(domain, test_size, seed=seed, split="test"),
        })
        for domain in domains
    }
