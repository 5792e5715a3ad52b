"""Forty English cloze and fact prompts, each with the word(s) that complete it, scored by exact match.

Written for this project as the retain-side counterpart of ``python_functions``: general knowledge and
everyday English that a pretrained model of ~100M parameters mostly gets, so a loss of English shows.
A completion matches when its first word equals one of the answers, ignoring case and punctuation.
"""

from __future__ import annotations

PROMPTS: list[dict] = [
    {"prompt": "The capital of France is", "answers": ["Paris"]},
    {"prompt": "The capital of Italy is", "answers": ["Rome"]},
    {"prompt": "The capital of Japan is", "answers": ["Tokyo"]},
    {"prompt": "The capital of Germany is", "answers": ["Berlin"]},
    {"prompt": "The capital of England is", "answers": ["London"]},
    {"prompt": "The capital of Spain is", "answers": ["Madrid"]},
    {"prompt": "Monday, Tuesday, Wednesday,", "answers": ["Thursday"]},
    {"prompt": "January, February, March,", "answers": ["April"]},
    {"prompt": "One, two, three, four,", "answers": ["five"]},
    {"prompt": "The opposite of hot is", "answers": ["cold"]},
    {"prompt": "The opposite of up is", "answers": ["down"]},
    {"prompt": "The opposite of black is", "answers": ["white"]},
    {"prompt": "The opposite of big is", "answers": ["small", "little"]},
    {"prompt": "The color of the sky on a clear day is", "answers": ["blue"]},
    {"prompt": "The color of grass is", "answers": ["green"]},
    {"prompt": "Snow is cold and its color is", "answers": ["white"]},
    {"prompt": "North, south, east and", "answers": ["west"]},
    {"prompt": "The sun rises in the east and sets in the", "answers": ["west"]},
    {"prompt": "Water freezes at zero degrees", "answers": ["Celsius"]},
    {"prompt": "There are seven days in a", "answers": ["week"]},
    {"prompt": "There are twelve months in a", "answers": ["year"]},
    {"prompt": "A baby cat is called a", "answers": ["kitten"]},
    {"prompt": "A baby dog is called a", "answers": ["puppy"]},
    {"prompt": "Bees make", "answers": ["honey"]},
    {"prompt": "Cows give us", "answers": ["milk"]},
    {"prompt": "The largest ocean on Earth is the", "answers": ["Pacific"]},
    {"prompt": "The planet we live on is called", "answers": ["Earth"]},
    {"prompt": "The closest star to the Earth is the", "answers": ["Sun"]},
    {"prompt": "We see with our eyes and hear with our", "answers": ["ears"]},
    {"prompt": "Fish live in", "answers": ["water"]},
    {"prompt": "Birds can fly because they have", "answers": ["wings"]},
    {"prompt": "Romeo and Juliet was written by William", "answers": ["Shakespeare"]},
    {"prompt": "The first president of the United States was George", "answers": ["Washington"]},
    {"prompt": "Ice is the solid form of", "answers": ["water"]},
    {"prompt": "Plants need sunlight, air and", "answers": ["water"]},
    {"prompt": "The fruit that keeps the doctor away is an", "answers": ["apple"]},
    {"prompt": "Spring, summer, autumn and", "answers": ["winter"]},
    {"prompt": "Red, orange, yellow, green,", "answers": ["blue"]},
    {"prompt": "The Statue of Liberty is in New", "answers": ["York"]},
    {"prompt": "Two plus two equals", "answers": ["four", "4"]},
]
