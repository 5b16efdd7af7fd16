"""Zero- and few-shot prompts for the prompting baselines (pure string functions).

The baselines score each label word as a continuation of the prompt with the LM head (scoring "choice_lm"):
`logits[k] = log p(label_words[k] | prompt)`, so `label_words[label]` must be the right continuation. Label
words carry a leading space (" Yes") because they follow "Answer:" in running text.

A template is a `str.format` pattern with one field, `{prompt}`, the task Example's text (literal braces in a
template must be doubled). A few-shot prompt is k solved shots, each `template.format(prompt=shot_prompt)`
followed by the shot's label word, then the query `template.format(prompt=query_prompt)`, joined by `separator`:

    Q: What do plants make? A: sugar
    Is the answer correct? Answer: Yes

    Q: What gas do we breathe out? A: helium
    Is the answer correct? Answer:

With weak-label few-shot (the paper's "few-shot with weak labels"), pass shots whose `label` is the weak label.

Default templates per task (`TEMPLATES`, `default_template(name)`):
  - answer checks, where the text shows one answer (sciq, piqa, dream, cosmos_qa, openbookqa,
    ethics_utilitarianism): "{prompt}\\nIs the answer correct? Answer:" with " No" / " Yes";
  - texts that already end with a yes/no question (boolq, hellaswag, social_i_qa, quartz, quail, multirc,
    mc_taco, anli_r2, paws, wic): "{prompt}\\nAnswer:" with " No" / " Yes";
  - ethics deontology / justice / virtue (texts end with "A:"): "{prompt}" with " No" / " Yes";
  - sentiment (amazon_polarity, sst2, twitter_sentiment): "{prompt}\\nSentiment:" with " negative" / " positive";
  - cola: "{prompt}\\nIs this sentence grammatical? Answer:" with " No" / " Yes";
  - anthropic_hh: "{prompt}\\n\\nWas the assistant's last reply good? Answer:" with " No" / " Yes".
Any other task gets `DEFAULT_TEMPLATE`.
"""
from __future__ import annotations

import random
from typing import Sequence

YES_NO = (" No", " Yes")
CHECK_ANSWER = "{prompt}\nIs the answer correct? Answer:"
ANSWER = "{prompt}\nAnswer:"
DEFAULT_TEMPLATE = (ANSWER, YES_NO)

TEMPLATES: dict[str, tuple[str, tuple[str, str]]] = {
    **{name: (CHECK_ANSWER, YES_NO)
       for name in ("sciq", "piqa", "dream", "cosmos_qa", "openbookqa", "ethics_utilitarianism")},
    **{name: (ANSWER, YES_NO)
       for name in ("boolq", "hellaswag", "social_i_qa", "quartz", "quail", "multirc", "mc_taco", "anli_r2",
                    "paws", "wic")},
    **{name: ("{prompt}", YES_NO) for name in ("ethics_deontology", "ethics_justice", "ethics_virtue")},
    **{name: ("{prompt}\nSentiment:", (" negative", " positive"))
       for name in ("amazon_polarity", "sst2", "twitter_sentiment")},
    "cola": ("{prompt}\nIs this sentence grammatical? Answer:", YES_NO),
    "anthropic_hh": ("{prompt}\n\nWas the assistant's last reply good? Answer:", YES_NO),
}


def default_template(task_name: str) -> tuple[str, tuple[str, str]]:
    """(template, label_words) for a task; `DEFAULT_TEMPLATE` for tasks without their own."""
    return TEMPLATES.get(task_name, DEFAULT_TEMPLATE)


def render(template: str, prompt: str) -> str:
    try:
        return template.format(prompt=prompt)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"template {template!r} must have exactly one field, {{prompt}}: {error!r}") from None


def _check_label(example: dict, label_words: Sequence[str]) -> None:
    if not 0 <= example["label"] < len(label_words):
        raise ValueError(f"example {example.get('id')!r}: label {example['label']} has no label word in "
                         f"{list(label_words)}")


def zero_shot_example(example: dict, template: str, label_words: Sequence[str]) -> dict:
    """The Example asked through `template`; candidates are the label words (scored with "choice_lm")."""
    _check_label(example, label_words)
    prompted = dict(example, prompt=render(template, example["prompt"]), candidates=list(label_words))
    prompted["meta"] = dict(example.get("meta", {}))
    return prompted


def few_shot_example(example: dict, shots: Sequence[dict], template: str, label_words: Sequence[str],
                     separator: str = "\n\n") -> dict:
    """The Example preceded by solved `shots` (their label words appended); meta["shot_ids"] names the shots."""
    for shot in shots:
        _check_label(shot, label_words)
    solved = [render(template, shot["prompt"]) + label_words[shot["label"]] for shot in shots]
    prompted = zero_shot_example(example, template, label_words)
    prompted["prompt"] = separator.join(solved + [prompted["prompt"]])
    prompted["meta"]["shot_ids"] = [shot["id"] for shot in shots]
    return prompted


def pick_shots(pool: Sequence[dict], k: int, seed: int, balanced: bool = True) -> list[dict]:
    """k Examples from `pool`, deterministic in `seed`.

    balanced: the classes take turns (from a seeded random first class), so they differ by at most one while
    each has examples left; the chosen shots are then shuffled so the last shot's class is not fixed.
    Draw shots from a pool disjoint from the examples they will precede (e.g. train shots for test queries).
    """
    if k > len(pool):
        raise ValueError(f"asked for {k} shots from a pool of {len(pool)}")
    rng = random.Random(seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    if not balanced:
        return [pool[i] for i in order[:k]]
    queues = {}
    for i in order:
        queues.setdefault(pool[i]["label"], []).append(i)
    classes = sorted(queues)
    turn = rng.randrange(len(classes)) if classes else 0
    picked = []
    while len(picked) < k:
        queue = queues[classes[turn % len(classes)]]
        if queue:
            picked.append(queue.pop(0))
        turn += 1
    rng.shuffle(picked)
    return [pool[i] for i in picked]
