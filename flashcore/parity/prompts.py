"""Prompts for the scenarios: random token ids for random weights, real chat prompts for a real model.

    prompts = Prompts.for_model(model, tokenizer, seed, device)
    prompts.ids(min_len, key)          # [1, L] token ids; L == min_len for random ids, L >= min_len for chats
    prompts.chat(index)                # (user message, [1, L] ids) of the index-th chat prompt of this seed

A model with a tokenizer gets chat prompts rendered through its own chat template (generation prompt appended),
so prefill, decode and the answers it generates are those of real use. Where a scenario needs a longer prompt
(several query tiles, thousands of tokens for many cache splits) earlier turns of a conversation are prepended
until the prompt is long enough. The seed picks and orders the prompts: another seed, other conversations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

# User messages of varied length (a few words to a few hundred tokens), and short assistant replies used when
# earlier turns are needed to make a conversation long enough. Written for this suite.
USER_MESSAGES = (
    "What is the capital of France?",
    "Give me three tips for writing clear emails at work.",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a cat watching the rain from a window.",
    "How do I reverse a list in Python? Show the shortest way and one that keeps the original list.",
    "What is the difference between a virus and a bacterium? Answer for a twelve-year-old.",
    "Summarize the following text in one sentence.\n\nThe town council met on Tuesday evening to discuss the "
    "future of the old railway station, which has stood empty for almost ten years. Some members argued that the "
    "building should be turned into a library and community centre, pointing out that the nearest library is a "
    "forty-minute bus ride away and that young families have been moving into the area. Others said the cost of "
    "repairing the roof and the heating would be far higher than building something new on the edge of town, "
    "and that the money would be better spent on roads. After two hours of debate the council agreed to ask an "
    "independent engineer to estimate the repair costs before making any decision, and to hold a public "
    "meeting in the spring so that residents can give their views.",
    "I am planning a vegetable garden on a small balcony that gets about five hours of sun a day. I have room "
    "for four large pots and a narrow planter along the railing. I would like to grow things that I can use in "
    "the kitchen during the summer, I do not have much time for watering during the week, and the balcony can "
    "get quite windy in the afternoon. Which plants would you choose, how would you arrange them, and what "
    "should I do first in early spring? Please keep the answer practical and list the steps in order.",
    "Translate into French: 'The train leaves at eight o'clock, so we should have breakfast early.'",
    "Here is a function that is supposed to return the largest even number in a list, or None when there is "
    "none. It fails on some inputs. Find the bug and explain the fix.\n\n"
    "def largest_even(numbers):\n    best = 0\n    for n in numbers:\n        if n % 2 == 0 and n > best:\n"
    "            best = n\n    return best\n",
    "List the planets of the solar system in order from the sun, with one short fact about each.",
    "My team keeps missing deadlines because tasks are not clearly assigned. We are six people working on a "
    "website, we meet once a week, and we use a shared spreadsheet to track work. Suggest a simple way to "
    "organise who does what, how to notice early when something is late, and how to run the weekly meeting "
    "so that it stays short. We do not want to buy new software.",
)

ASSISTANT_REPLIES = (
    "Sure. Here is a short answer: start with the main point, keep each sentence simple, and end with what "
    "you need from the reader.",
    "Of course. The key idea is to break the problem into small steps and check each one before moving on.",
    "Happy to help. In short, it depends on the details, but the usual approach is to begin with the simplest "
    "option and improve it once it works.",
)

SYSTEM_MESSAGE = "You are a helpful assistant. Answer clearly and briefly."


@dataclass
class Prompts:
    vocab: int
    device: torch.device
    seed: int
    tokenizer: object | None = None

    @classmethod
    def for_model(cls, model, tokenizer, seed: int, device) -> "Prompts":
        return cls(vocab=model.config.vocab_size, device=torch.device(device), seed=seed, tokenizer=tokenizer)

    @property
    def real(self) -> bool:
        """Chat prompts through the model's tokenizer (else random token ids)."""
        return self.tokenizer is not None

    def _order(self) -> list[int]:
        order = list(range(len(USER_MESSAGES)))
        random.Random(self.seed).shuffle(order)
        return order

    def _render(self, messages: list[dict]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in transformers 5.x
                out = out["input_ids"]
            return list(out)
        text = "\n\n".join(m["content"] for m in messages) + "\n\n"
        return list(tok(text)["input_ids"])

    def conversation(self, index: int, min_len: int = 0) -> tuple[str, list[int]]:
        """The index-th user message of this seed, after enough earlier turns to reach min_len tokens."""
        order = self._order()
        user = USER_MESSAGES[order[index % len(order)]]
        history: list[dict] = []
        ids = self._render([{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": user}])
        turn = 1
        while len(ids) < min_len:
            history += [{"role": "user", "content": USER_MESSAGES[order[(index + turn) % len(order)]]},
                        {"role": "assistant", "content": ASSISTANT_REPLIES[turn % len(ASSISTANT_REPLIES)]}]
            ids = self._render([{"role": "system", "content": SYSTEM_MESSAGE}, *history,
                                {"role": "user", "content": user}])
            turn += 1
        return user, ids

    def chat(self, index: int, min_len: int = 0) -> tuple[str, torch.Tensor]:
        user, ids = self.conversation(index, min_len)
        return user, torch.tensor([ids], dtype=torch.long, device=self.device)

    def ids(self, min_len: int, key: int) -> torch.Tensor:
        """[1, L] prompt ids: random ids of exactly min_len tokens (seed + key), or the key-th chat of at least
        min_len tokens (real model)."""
        if self.real:
            return self.chat(key, min_len)[1]
        g = torch.Generator().manual_seed(self.seed * 1000 + key)
        return torch.randint(0, self.vocab, (1, min_len), generator=g).to(self.device)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.real else " ".join(map(str, ids))
