"""A model without a chat template answers a plain transcript: its chat replies stop where it starts the user's
next turn, as `generate` stops them; a templated model's replies get no such stop."""

import pytest

from personaedit.models.generation import TRANSCRIPT_TURN
from personaedit.serve.app import create_app
from test_serve_app import _chat, post
from tiny import tiny_lm


@pytest.mark.parametrize("chat_template", [False, True])
def test_chat_replies_of_a_base_model_stop_at_the_next_user_turn(chat_template):
    app = create_app(tiny_lm(chat_template=chat_template), {}, batch_wait_ms=0, max_batch=2, default_max_tokens=4)
    submitted = []
    submit = app.state.batcher.submit
    app.state.batcher.submit = lambda request: (submitted.append(request), submit(request))[1]
    response = post(app, _chat(stop=["###"]))
    assert response.status_code == 200
    (request,) = submitted
    assert request.stop == (("###",) if chat_template else ("###", TRANSCRIPT_TURN))
