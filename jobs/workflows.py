"""Workflows: predefined chains, groups and chords of catalogued job types.

A workflow template has a parameter form and builds a *plan*: a JSON tree of
``step``, ``chain``, ``group`` and ``chord`` nodes. ``services.workflow_submit`` turns
the plan into one Job per step (PENDING, before any worker sees them) and publishes
it as a Celery canvas whose task ids are those Job ids. The plan is stored on the
root run, so the tree can be shown, and published again by the relay if the broker
was down at submit.

No step waits for another's result: a chain passes the previous result to the next
step, and a chord's callback runs when its group is done (Celery's chord counter in
the result backend), so no worker process ever blocks on a subtask.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from celery import chain, chord, group
from celery.canvas import _chain  # what chain(...) returns
from django import forms

# --- Plans ------------------------------------------------------------------------


def step(job_type: str, params: dict, label: str, *, takes_result: bool = False) -> dict:
    """One run of a job type; ``takes_result``: it receives the previous result."""
    return {
        "type": "step",
        "job_type": job_type,
        "params": params,
        "label": label,
        "takes_result": takes_result,
    }


def in_chain(*children: dict) -> dict:
    return {"type": "chain", "children": list(children)}


def in_group(*children: dict) -> dict:
    return {"type": "group", "children": list(children)}


def in_chord(header: list[dict], body: dict) -> dict:
    return {"type": "chord", "children": [*header, body], "header_size": len(header)}


def steps(node: dict) -> Iterator[dict]:
    """The step nodes of a plan, in the order they are declared."""
    if node["type"] == "step":
        yield node
        return
    for child in node["children"]:
        yield from steps(child)


def chord_parts(node: dict) -> tuple[list[dict], dict]:
    size = node["header_size"]
    return node["children"][:size], node["children"][size]


def _after(node: dict) -> dict[str, set[str]]:
    """For each step id, the ids of the steps that run only after it."""
    deps: dict[str, set[str]] = {s["id"]: set() for s in steps(node)}

    def follow(before: list[dict], then: list[dict]) -> None:
        later = {s["id"] for n in then for s in steps(n)}
        for n in before:
            for s in steps(n):
                deps[s["id"]] |= later

    def walk(n: dict) -> None:
        if n["type"] == "step":
            return
        if n["type"] == "chain":
            children = n["children"]
            for i, child in enumerate(children):
                follow([child], children[i + 1 :])
        elif n["type"] == "chord":
            header, body = chord_parts(n)
            follow(header, [body])
        for child in n["children"]:
            walk(child)

    walk(node)
    return deps


def downstream(plan: dict, step_id: str) -> set[str]:
    """Steps that can no longer run once ``step_id`` has failed."""
    return _after(plan).get(step_id, set())


def parents(plan: dict) -> dict[str, list[str]]:
    """For each step id, the steps whose completion starts it (the tree's links)."""
    links: dict[str, list[str]] = {s["id"]: [] for s in steps(plan)}

    def last_steps(n: dict) -> list[str]:
        if n["type"] == "step":
            return [n["id"]]
        if n["type"] == "chain":
            return last_steps(n["children"][-1])
        if n["type"] == "chord":
            return last_steps(chord_parts(n)[1])
        return [i for child in n["children"] for i in last_steps(child)]

    def first_steps(n: dict) -> list[str]:
        if n["type"] == "step":
            return [n["id"]]
        if n["type"] == "chain":
            return first_steps(n["children"][0])
        if n["type"] == "chord":
            return [i for child in chord_parts(n)[0] for i in first_steps(child)]
        return [i for child in n["children"] for i in first_steps(child)]

    def walk(n: dict) -> None:
        if n["type"] == "step":
            return
        pairs = []
        if n["type"] == "chain":
            pairs = list(itertools.pairwise(n["children"]))
        elif n["type"] == "chord":
            header, body = chord_parts(n)
            pairs = [(h, body) for h in header]
        for before, after in pairs:
            for target in first_steps(after):
                links[target] += [i for i in last_steps(before) if i not in links[target]]
        for child in n["children"]:
            walk(child)

    walk(plan)
    return links


def to_canvas(node: dict, signature_for: Callable[[dict], object]):
    """The Celery canvas of a plan; ``signature_for`` makes each step's signature."""
    kind = node["type"]
    if kind == "step":
        return signature_for(node)
    children = [to_canvas(child, signature_for) for child in node["children"]]
    if kind == "chain":
        return chain(*children)
    if kind == "group":
        return group(*children)
    size = node["header_size"]
    return chord(group(*children[:size]), children[size])


def link_error(canvas, errback) -> None:
    """Attach the workflow's errback to every step that can fail on its own.

    A chord's members report through its callback (Celery fails the callback with
    ChordError), so only the callback gets it; linking each member too would run
    the errback twice for one failure.
    """
    if isinstance(canvas, chord):
        link_error(canvas.body, errback)
    elif isinstance(canvas, (_chain, group)):
        for task in canvas.tasks:
            link_error(task, errback)
    else:
        canvas.link_error(errback)


# --- Templates ----------------------------------------------------------------------


@dataclass(frozen=True)
class WorkflowTemplate:
    name: str
    title: str
    description: str
    shape: str  # chain, group or chord: shown to people
    form: type[forms.Form]
    build: Callable[[dict], dict]

    def clean_params(self, data: dict | None) -> tuple[dict | None, dict]:
        form = self.form(data=data or {})
        if not form.is_valid():
            return None, {name: list(errors) for name, errors in form.errors.items()}
        return dict(form.cleaned_data), {}

    def job_type_names(self) -> set[str]:
        """The job types its plan uses (for the "who may run it" check)."""
        return {s["job_type"] for s in steps(self.build(self.example()))} | {"workflow_failed"}

    def example(self) -> dict:
        form = self.form()
        return {name: f.initial for name, f in form.fields.items()}


TEMPLATES: dict[str, WorkflowTemplate] = {}  # filled by register(), as jobs.tasks loads


def register(template: WorkflowTemplate) -> WorkflowTemplate:
    TEMPLATES[template.name] = template
    return template


def get(name: str) -> WorkflowTemplate | None:
    return TEMPLATES.get(name)
