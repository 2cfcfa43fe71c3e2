"""Continuous batching: rows join a batch mid-decode and leave it when they stop, with the same greedy output
as alone; the batcher gathers a burst into one prefill and lets late requests join between steps."""

import threading
import time

import pytest
import torch

from personaedit.models.kvcache import cache_argument, cache_of
from personaedit.serve import kvrows
from personaedit.serve.batcher import ContinuousBatcher
from personaedit.serve.decode import RowRequest, RunningBatch, generate_rows
from personaedit.serve.rowwise import PreparedEdit
from test_serve_rowwise import _prompt_ids, served_edits
from tiny import tiny_lm

PROMPTS = ["What do you like?", "Hi", "Tell me about jazz music and the weather today, please.", "Plans for tonight?",
           "Do you like parties?"]


def _requests(lm, max_tokens=(12, 12, 12, 12, 12)):
    """One request per prompt, each under another edit (or none), with its own token budget."""
    edits = served_edits(lm)
    assigned = [None, *((PreparedEdit.of(lm, edits[name]), 1.0) for name in ("steer", "low_rank", "dense", "composed"))]
    return [RowRequest(_prompt_ids(lm, prompt), max_tokens=limit, edit=edit)
            for prompt, limit, edit in zip(PROMPTS, max_tokens, assigned)]


def _alone(lm, requests):
    return [generate_rows(lm, [RowRequest(r.prompt_ids, r.max_tokens, edit=r.edit)])[0] for r in requests]


def _same(got, expected):
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == [(o.token_ids, o.text, o.finish_reason) for o in expected]


def _cache_rows(batch):
    return batch.cache.layers[0].keys.shape[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rows_joining_mid_decode_give_the_same_greedy_output_as_alone(family):
    lm = tiny_lm(family)
    requests = _requests(lm)
    alone = _alone(lm, requests)
    assert all(o.finish_reason == "length" for o in alone)  # every row is still decoding when others join
    batch = RunningBatch(lm)
    rows = batch.admit(requests[:1])
    for _ in range(3):
        batch.step()
    # a longer and a shorter prompt than the running row's 4 generated tokens + prompt: both sides get padded
    rows += batch.admit(requests[1:3])
    batch.step()
    rows += batch.admit(requests[3:])
    assert len(batch) == 5 and _cache_rows(batch) == 5 and batch.mask.shape[0] == 5
    while batch:
        batch.step()
    _same([row.outcome for row in rows], alone)


def test_prompts_of_very_different_lengths_are_prefilled_apart_then_joined(lm, monkeypatch):
    context = PreparedEdit.of(lm, served_edits(lm)["context"])  # a system prompt and a demonstration: long
    similar = [request for index, request in enumerate(_requests(lm)) if index in (0, 3, 4)]  # 26-29 tokens
    requests = similar + [RowRequest(_prompt_ids(lm, "Hi", context), max_tokens=12, edit=(context, 1.0))]
    lengths = [len(r.prompt_ids) for r in requests]
    assert max(lengths) > 1.5 * sorted(lengths)[-2]
    alone = _alone(lm, requests)
    passes = []
    real = RunningBatch._prefill
    monkeypatch.setattr(RunningBatch, "_prefill", lambda self, rows: passes.append(len(rows)) or real(self, rows))
    batch = RunningBatch(lm)
    rows = batch.admit(requests)
    assert sorted(passes) == [1, 3] and batch.mask.shape == (4, max(lengths))
    while batch:
        batch.step()
    _same([row.outcome for row in rows], alone)


def test_finished_rows_leave_the_batch_and_answer_at_once(lm):
    requests = _requests(lm, max_tokens=(3, 10, 2, 6, 10))
    alone = _alone(lm, requests)
    assert all(o.finish_reason == "length" for o in alone)
    batch, steps, answered_at = RunningBatch(lm), [0], {}
    for index, request in enumerate(requests):
        request.on_done = lambda outcome, index=index: answered_at.setdefault(index, steps[0])
    rows = batch.admit(requests)
    sizes = [len(batch)]
    while batch:
        steps[0] += 1
        batch.step()
        sizes.append(len(batch))
        if batch:
            assert _cache_rows(batch) == len(batch) == batch.mask.shape[0]
            assert bool(batch.mask[:, 0].any())  # no column that is padding on every row is kept
    assert sizes == [5, 4, 3, 3, 3, 2, 2, 2, 2, 0]
    assert answered_at == {2: 1, 0: 2, 3: 5, 1: 9, 4: 9}  # each answered on the step it stopped
    _same([row.outcome for row in rows], alone)


def test_a_long_prompt_leaving_takes_its_padding_with_it(lm):
    requests = _requests(lm, max_tokens=(8, 8, 1, 8, 8))  # the long jazz prompt stops at its first token
    batch = RunningBatch(lm)
    batch.admit(requests)
    longest_left = max(len(r.prompt_ids) for i, r in enumerate(requests) if i != 2)
    assert len(batch) == 4 and batch.mask.shape[1] == longest_left
    assert batch.cache.get_seq_length() == longest_left


def test_cancelled_rows_leave_at_the_next_step(lm):
    requests = _requests(lm)
    batch = RunningBatch(lm)
    batch.admit(requests)
    batch.step()
    requests[1].cancelled = True
    batch.step()
    assert len(batch) == 4 and all(row.request is not requests[1] for row in batch.rows)


def test_join_then_keep_rows_gives_back_each_cache_unchanged(lm):
    def prefilled(prompt):
        ids = torch.tensor([_prompt_ids(lm, prompt)])
        with torch.no_grad():
            cache = cache_of(lm.model(input_ids=ids, use_cache=True))
        return cache, torch.ones_like(ids)

    (short, short_mask), (long, long_mask) = prefilled("Hi"), prefilled("Tell me about jazz music, please.")
    keys = [layer.keys.clone() for layer in short.layers]
    assert kvrows.joinable(short)
    cache, mask = kvrows.join(short, short_mask, long, long_mask)
    assert mask.shape == (2, long_mask.shape[1]) and mask[0].sum() == short_mask.shape[1]
    cache, mask = kvrows.keep_rows(cache, mask, [0])
    assert torch.equal(mask, short_mask)
    assert all(torch.equal(layer.keys, k) for layer, k in zip(cache.layers, keys))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_step_on_joined_then_thinned_caches_gives_each_row_its_logits_alone(family):
    """Greedy tokens of a tiny random model barely depend on attention, so check the logits themselves."""
    lm = tiny_lm(family)
    prompts = ["Hi", "Tell me about jazz music, please.", "Plans for tonight?"]

    def prefill(prompt):
        ids = torch.tensor([_prompt_ids(lm, prompt)])
        with torch.no_grad():
            return cache_of(lm.model(input_ids=ids, use_cache=True)), torch.ones_like(ids)

    def step(cache, mask, token=7):
        positions = mask.sum(1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        with torch.no_grad():
            output = lm.model(input_ids=torch.full((len(mask), 1), token), attention_mask=mask, position_ids=positions,
                              use_cache=True, **{cache_argument(lm.model): cache})
        return output.logits[:, -1], cache_of(output), mask

    alone = [step(*prefill(prompt))[0][0] for prompt in prompts]
    cache, mask = prefill(prompts[0])
    for prompt in prompts[1:]:
        cache, mask = kvrows.join(cache, mask, *prefill(prompt))
    logits, cache, mask = step(cache, mask)
    for got, expected in zip(logits, alone):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    cache, mask = kvrows.keep_rows(cache, mask, [2, 0])  # the long row leaves; its padding goes with it
    assert mask.shape[1] == len(_prompt_ids(lm, prompts[2])) + 1
    logits, _, _ = step(cache, mask, token=9)
    for got, prompt in zip(logits, [prompts[2], prompts[0]]):
        single, single_mask = prefill(prompt)
        _, single, single_mask = step(single, single_mask)
        torch.testing.assert_close(got, step(single, single_mask, token=9)[0][0], atol=1e-5, rtol=1e-5)


def test_sliding_window_caches_let_rows_leave_but_not_join():
    lm = tiny_lm("mistral")  # its cache layers keep a sliding window
    requests = _requests(lm, max_tokens=(4, 8, 8, 8, 8))
    alone = _alone(lm, requests)
    batch = RunningBatch(lm)
    assert batch.can_admit()
    rows = batch.admit(requests)
    assert not batch.can_admit()
    while batch:
        batch.step()
    _same([row.outcome for row in rows], alone)


class _Collector:
    def __init__(self, count):
        self.outcomes = [None] * count
        self.done = threading.Event()

    def request(self, request, index):
        def on_done(outcome):
            self.outcomes[index] = outcome
            if all(o is not None for o in self.outcomes):
                self.done.set()

        request.on_done = on_done
        return request


def test_a_burst_is_prefilled_together_though_it_outlasts_the_wait(lm):
    requests = _requests(lm)
    alone = _alone(lm, requests)
    collector = _Collector(len(requests))
    batcher = ContinuousBatcher(lm, wait_s=0.25, max_wait_s=5.0)
    try:
        for index, request in enumerate(requests):
            batcher.submit(collector.request(request, index))
            time.sleep(0.08)  # each within the wait of the previous; all of them 0.4 s, past one wait
        assert collector.done.wait(60)
    finally:
        batcher.close()
    assert list(batcher.admissions) == [5]
    _same(collector.outcomes, alone)


def test_requests_arriving_during_decoding_join_the_running_batch(lm):
    requests = _requests(lm, max_tokens=(30, 12, 12, 12, 12))
    alone = _alone(lm, requests)
    assert alone[0].finish_reason == "length"
    collector = _Collector(len(requests))
    batcher = ContinuousBatcher(lm, wait_s=0.0)
    first, submitted = requests[0], []

    def on_delta(_text):  # runs on the batcher's thread while the first row decodes
        if not submitted:
            submitted.append(True)
            for index, request in enumerate(requests[1:], start=1):
                batcher.submit(collector.request(request, index))

    first.on_delta = on_delta
    try:
        batcher.submit(collector.request(first, 0))
        assert collector.done.wait(60)
    finally:
        batcher.close()
    assert list(batcher.admissions) == [1, 4]
    assert max(batcher.steps) == 5 and batcher.steps[0] == 1
    _same(collector.outcomes, alone)


def test_more_requests_than_max_batch_wait_for_room(lm):
    requests = _requests(lm, max_tokens=(3, 6, 9, 12, 4))
    alone = _alone(lm, requests)
    collector = _Collector(len(requests))
    batcher = ContinuousBatcher(lm, max_batch=2, wait_s=0.5)
    try:
        for index, request in enumerate(requests):
            batcher.submit(collector.request(request, index))
        assert collector.done.wait(60)
    finally:
        batcher.close()
    assert max(batcher.steps) == 2 and sum(batcher.admissions) == 5 and len(batcher.admissions) > 2
    _same(collector.outcomes, alone)


def test_a_failing_prefill_answers_its_requests_and_the_server_goes_on(lm, monkeypatch):
    collector = _Collector(1)
    batcher = ContinuousBatcher(lm, wait_s=0.0)
    broken = RowRequest(_prompt_ids(lm, "Hi"), max_tokens=4)
    real = RunningBatch.admit

    def failing(self, requests):
        if broken in requests:
            raise RuntimeError("boom")
        return real(self, requests)

    monkeypatch.setattr(RunningBatch, "admit", failing)
    try:
        batcher.submit(collector.request(broken, 0))
        assert collector.done.wait(60)
        assert collector.outcomes[0].error == "RuntimeError: boom"
        later = _Collector(1)
        batcher.submit(later.request(RowRequest(_prompt_ids(lm, "Hi"), max_tokens=4), 0))
        assert later.done.wait(60) and later.outcomes[0].error is None
    finally:
        batcher.close()
