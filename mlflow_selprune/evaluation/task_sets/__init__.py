"""Small, offline task sets written for this project: what "did the capability go away?" means to a person.

``python_functions.TASKS``: Python function-completion tasks (signature + docstring, checked by ``assert``
lines), for the forget side of a model that unlearns code. ``english_cloze.PROMPTS``: English cloze and fact
prompts scored by exact match, for the retain side.
"""
