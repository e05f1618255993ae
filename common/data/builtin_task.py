"""The built-in demo task: routing customer-support tickets to a department.

Generated here from templates and word lists with a seeded RNG (no data is fetched or
shipped), so the default `peft-sim` run works on any machine. Held-out tickets are
built from phrasings and subjects that never occur in training tickets (the last
entries of each list), so held-out accuracy measures generalization, not recall of
the training sentences. Each ticket also carries
the `branch` office that received it; branches see different mixes of departments,
which gives a natural non-IID split (`--partition natural:branch`).
"""

from __future__ import annotations

import random

from fedpeft.common.data.records import Record, TaskSpec

DEPARTMENTS = ("billing", "shipping", "technical", "account")
BRANCHES = ("north", "south", "east", "west")
# Share of each department in each branch's ticket queue (rows sum to 1).
BRANCH_MIX = {
    "north": (0.55, 0.15, 0.15, 0.15),
    "south": (0.15, 0.55, 0.15, 0.15),
    "east": (0.15, 0.15, 0.55, 0.15),
    "west": (0.15, 0.15, 0.15, 0.55),
}

_SLOTS: dict[str, dict[str, list[str]]] = {
    "billing": {
        "issue": ["I was charged twice for", "there is an unexpected fee on", "my refund never arrived for",
                  "the invoice shows the wrong amount for", "my card was billed again for",
                  "I need a receipt for", "the discount code was not applied to"],
        "thing": ["my last order", "the annual plan", "order {n}", "the March invoice", "my subscription renewal",
                  "the gift card purchase"],
    },
    "shipping": {
        "issue": ["the parcel still has not arrived for", "the courier lost", "the tracking page is frozen for",
                  "the box was damaged on delivery for", "the wrong item was delivered for",
                  "delivery keeps getting postponed for", "the package went to my old address for"],
        "thing": ["my last order", "order {n}", "the replacement part", "the express delivery", "my return label",
                  "the furniture set"],
    },
    "technical": {
        "issue": ["the app crashes whenever I open", "I get error {n} when I use", "nothing loads on",
                  "the screen goes black on", "the firmware update bricked", "sync keeps failing on",
                  "the device will not pair with"],
        "thing": ["the settings page", "my router", "the desktop client", "the mobile app", "my smart speaker",
                  "the printer driver"],
    },
    "account": {
        "issue": ["I cannot log in to", "please reset the password of", "I want to delete", "someone else accessed",
                  "I need to change the email on", "two-factor codes never arrive for", "please merge my two profiles into"],
        "thing": ["my account", "my profile", "the family account", "my business login", "my old username",
                  "the admin account"],
    },
}
_OPENERS = ["Hi,", "Hello team,", "Urgent:", "Good morning.", "Help please!", "Dear support,", ""]
_CLOSERS = ["Thanks.", "Please fix this soon.", "This is the third time I write.", "Regards, Sam.",
            "Can someone call me back?", ""]

TEMPLATE = "Support ticket: {text}\nDepartment:"


def builtin_task() -> TaskSpec:
    """The TaskSpec of the built-in ticket-routing task (label word = department name)."""
    return TaskSpec(kind="classification", template=TEMPLATE, label_column="label",
                    verbalizer={d: d for d in DEPARTMENTS})


HELD_OUT_PER_SLOT = 2
"""The last this-many phrasings/subjects of every list appear only in held-out tickets."""


def _slot_values(values: list[str], held_out: bool) -> list[str]:
    return values[-HELD_OUT_PER_SLOT:] if held_out else values[:-HELD_OUT_PER_SLOT]


def _ticket(rng: random.Random, department: str, held_out: bool) -> str:
    slots = _SLOTS[department]
    issue = rng.choice(_slot_values(slots["issue"], held_out)).format(n=rng.randint(100, 9999))
    thing = rng.choice(_slot_values(slots["thing"], held_out)).format(n=rng.randint(10000, 99999))
    body = f"{issue} {thing}."
    body = body[0].upper() + body[1:]
    return " ".join(part for part in (rng.choice(_OPENERS), body, rng.choice(_CLOSERS)) if part)


def generate_tickets(num_rows: int, seed: int, held_out: bool = False) -> list[Record]:
    """`num_rows` tickets spread evenly over branches, departments drawn per branch mix;
    `held_out=True` draws from the phrasings reserved for evaluation."""
    rng = random.Random(seed)
    rows: list[Record] = []
    for i in range(num_rows):
        branch = BRANCHES[i % len(BRANCHES)]
        department = rng.choices(DEPARTMENTS, weights=BRANCH_MIX[branch])[0]
        rows.append({"text": _ticket(rng, department, held_out), "label": department, "branch": branch})
    rng.shuffle(rows)
    return rows


def builtin_splits(train_rows: int = 800, eval_rows: int = 200, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Train and held-out rows from independent seeds (eval rows are balanced over
    branches, so the eval set is close to uniform over departments)."""
    return generate_tickets(train_rows, seed), generate_tickets(eval_rows, seed + 1_000_003, held_out=True)
