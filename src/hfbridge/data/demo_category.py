"""A generated classification task: route a customer-support ticket to its department.

Four labels (``billing``, ``shipping``, ``technical``, ``account``), tickets composed from an opener, one of ten
phrasings of an issue per department, and a closer, with products, amounts, dates and order numbers filled in.
It is generated deterministically from a seed, so nothing is downloaded. Train and test tickets share the
phrasings but draw products and order numbers from disjoint halves of their pools, so no test ticket is ever a
training ticket.
"""

from __future__ import annotations

import random

LABELS = ("billing", "shipping", "technical", "account")
TASK = "Route the customer support ticket to the department that should handle it."

_PRODUCTS = ["coffee grinder", "desk lamp", "yoga mat", "bluetooth speaker", "water bottle", "laptop stand",
             "electric kettle", "phone case", "backpack", "air purifier", "standing desk", "blender",
             "wireless mouse", "rice cooker", "monitor arm", "hiking boots", "e-reader", "smart plug",
             "office chair", "toaster"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_OPENERS = ["Hi,", "Hello there.", "Good morning,", "Hey support team,", "To whom it may concern:", "",
            "Hi, hoping you can help.", "Quick question."]
_CLOSERS = ["Thanks.", "Please help.", "Thank you in advance!", "Can you sort this out?", "", "Regards, Sam",
            "This is urgent.", "Let me know."]

_ISSUES = {
    "billing": [
        "I was charged twice for order #{order}.",
        "My credit card statement shows ${amount} for the {product}, but the price was lower.",
        "I returned the {product} on {date} and still have not received my refund.",
        "The invoice for order #{order} has the wrong VAT number on it.",
        "Why did my subscription renew at ${amount} instead of the discounted rate?",
        "A coupon code was not applied to my purchase of the {product}.",
        "I need a copy of the receipt for order #{order} for my expense report.",
        "You billed me for a {product} that I cancelled on {date}.",
        "My payment for order #{order} was declined but the money left my account.",
        "Can I get a partial refund of ${amount}? The {product} went on sale a day after I bought it.",
    ],
    "shipping": [
        "My {product} was supposed to arrive on {date} but it is still not here.",
        "The tracking number for order #{order} has not updated in a week.",
        "The box with my {product} arrived crushed and the item is dented.",
        "I moved; can you change the delivery address for order #{order}?",
        "The courier left my {product} at the wrong house.",
        "Order #{order} shows as delivered, but nothing came.",
        "Do you ship the {product} to Canada, and how long does it take?",
        "I received a {product} but I ordered something else (order #{order}).",
        "Only one of the two parcels of order #{order} has arrived.",
        "Can I pick up my {product} at the warehouse instead of waiting for delivery?",
    ],
    "technical": [
        "My {product} will not turn on after the latest firmware update.",
        "The app crashes every time I try to pair my {product}.",
        "The {product} disconnects from Wi-Fi every few minutes.",
        "The {product} makes a loud buzzing noise when it runs.",
        "The setup instructions for the {product} do not match the buttons on it.",
        "The battery of my {product} drains in under an hour.",
        "Error code E{order} appears on the display of the {product}.",
        "The {product} overheats after ten minutes of use.",
        "The companion app does not recognise my {product} since {date}.",
        "The touch controls on my {product} stopped responding.",
    ],
    "account": [
        "I cannot log in; the password reset email never arrives.",
        "Please delete my account and all my personal data.",
        "I want to change the email address on my profile.",
        "Someone else seems to have accessed my account on {date}.",
        "My account was locked after too many login attempts.",
        "How do I turn off the marketing emails?",
        "I have two accounts by mistake; can you merge them?",
        "The two-factor authentication code is never accepted.",
        "I cannot update the phone number in my account settings.",
        "My loyalty points disappeared from my profile after {date}.",
    ],
}


def _fill(template: str, rng: random.Random, products: list[str], order_base: int) -> str:
    return template.format(
        product=rng.choice(products),
        order=order_base + rng.randrange(0, 50000) * 2,
        amount=f"{rng.randrange(5, 400)}.{rng.randrange(100):02d}",
        date=f"{rng.choice(_MONTHS)} {rng.randrange(1, 29)}",
    )


def ticket_records(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` records ``{"ticket": ..., "department": ...}``, the labels balanced in turn. ``split`` is ``train``
    or ``test``: each draws products and order numbers from its own half of the pools."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    rng = random.Random(f"tickets-{seed}-{split}")
    parity = 0 if split == "train" else 1
    products = _PRODUCTS[parity::2]
    order_base = 100000 + parity
    records = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        parts = [rng.choice(_OPENERS), _fill(rng.choice(_ISSUES[label]), rng, products, order_base),
                 rng.choice(_CLOSERS)]
        records.append({"ticket": " ".join(p for p in parts if p), "department": label})
    rng.shuffle(records)
    return records

