"""Constraints on what decoding may produce: a closed set of answers (a token trie over the labels) or a grammar
(xgrammar: JSON, a JSON schema, a regex, EBNF). Each works on two levels: the compiled constraint (LabelTrie,
Grammar), built once, and its per-row state during one batch's decode (TrieRows, GrammarRows), which masks the
logits of the rows still generating and follows each row's tokens."""

from __future__ import annotations

import torch

from ..errors import TunewiseError


MAX_CHOICES = 10_000  # a larger choice list is a grammar, not a label set


def _depth(node: dict) -> int:
    """The number of tokens on the longest path below node."""
    return max((1 + _depth(child) for t, child in node.items() if t is not None), default=0)


class ChoiceError(TunewiseError, ValueError):
    """A choice list the engine cannot enforce (empty, too large, an empty or non-string choice)."""


def check_choices(choices, field: str = "choices") -> list[str]:
    """The choice list, de-duplicated in order; ChoiceError naming `field` when it cannot be enforced."""
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ChoiceError(f"{field}: an empty choice list; give at least one answer")
    if len(choices) > MAX_CHOICES:
        raise ChoiceError(f"{field}: {len(choices)} choices; at most {MAX_CHOICES}")
    bad = [c for c in choices if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ChoiceError(f"{field}: every choice must be a non-empty string (got {bad[0]!r})")
    return list(dict.fromkeys(choices))


class LabelTrie:
    """The token sequences of a closed set of answers, as a trie: decoding steps through it, each step
    allowing only the tokens that continue some answer (and end-of-turn where an answer is complete).
    Once the tokens so far leave a single answer possible, the rest is filled in without more forward
    passes: a label needs as many model steps as it takes to tell it apart from the others."""

    def __init__(self, tokenizer, choices: list[str], field: str = "choices"):
        self.choices = check_choices(choices, field)
        self.root: dict = {}
        for c in self.choices:
            node = self.root
            for t in tokenizer.encode(c, add_special_tokens=False):
                node = node.setdefault(t, {})
            node[None] = c  # None marks a complete answer
        self.depth = _depth(self.root)
        self._only: dict[int, list[int] | None] = {}

    def only(self, node: dict) -> list[int] | None:
        """The tokens left when exactly one answer continues from node (empty when node completes it and
        nothing longer goes on from there); None while several answers remain possible."""
        key = id(node)
        if key not in self._only:
            rest, cur = [], node
            while None not in cur and len(cur) == 1:
                t = next(iter(cur))
                rest.append(t)
                cur = cur[t]
            self._only[key] = rest if list(cur) == [None] else None
        return self._only[key]


GRAMMAR_KINDS = ("json", "json_schema", "regex", "ebnf", "structural_tag")


class Grammar:
    """A grammar decoding is restricted to, through xgrammar: any JSON ("json"), a JSON schema, a regex or an EBNF
    grammar (`kind`, `source`). Compiled once per engine and grammar; each row steps its own matcher, and at every
    step the tokens the grammar does not allow are masked out of the logits."""

    def __init__(self, engine, kind: str, source: str = ""):  # engine: the Engine whose tokenizer it compiles for
        try:
            import xgrammar as xgr
        except ImportError:
            raise ChoiceError(f"{kind}: constrained decoding to a grammar needs xgrammar (pip install --no-deps xgrammar apache-tvm-ffi)") from None
        if kind not in GRAMMAR_KINDS:
            raise ChoiceError(f"grammar kind {kind!r}: one of {', '.join(GRAMMAR_KINDS)}")
        self.xgr, self.kind = xgr, kind
        compiler = engine._grammar_compiler()
        try:
            if kind == "json":
                self.compiled = compiler.compile_builtin_json_grammar()
            elif kind == "json_schema":
                self.compiled = compiler.compile_json_schema(source, any_whitespace=False)
            elif kind == "regex":
                self.compiled = compiler.compile_regex(source)
            elif kind == "structural_tag":  # text with tagged parts held to their schemas (data.tools.call_grammar)
                self.compiled = compiler.compile_structural_tag(source)
            else:
                self.compiled = compiler.compile_grammar(source)
        except (RuntimeError, ValueError) as e:
            raise ChoiceError(f"{kind}: cannot be compiled: {str(e).splitlines()[0][:300]}") from None
        self.vocab = engine._vocab_size()

    def matcher(self):
        return self.xgr.GrammarMatcher(self.compiled)


def restrict(logits: torch.Tensor, nodes: list[dict], end_ids: list[int]) -> torch.Tensor:
    """Logits with everything but each row's allowed continuations set to -inf (end-of-turn is allowed where the
    tokens so far are a complete answer)."""
    allow = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    for j, node in enumerate(nodes):
        ids = [t for t in node if t is not None] + (end_ids if None in node or not node else [])
        allow[j, ids] = True
    return logits.masked_fill(~allow, float("-inf"))


class TrieRows:
    """A label trie's state in each row of a batch: where the row stands in the trie."""

    def __init__(self, trie: LabelTrie, rows: int, eos: set[int]):
        if not eos:
            raise ChoiceError("choices: the model has no end-of-turn token to end a constrained answer with")
        self.trie, self.nodes, self.eos, self._end = trie, [trie.root] * rows, eos, sorted(eos)

    def mask(self, logits: torch.Tensor, alive: list[int]) -> torch.Tensor:
        return restrict(logits, [self.nodes[row] for row in alive], self._end)

    def accept(self, row: int, token: int) -> list[int] | None:
        """Follow the row's token; the tokens that complete its answer when a single answer is left (the row ends
        without more model steps), else None."""
        node = self.nodes[row] = self.nodes[row][token] if token in self.nodes[row] else {}
        return self.trie.only(node) if token not in self.eos else None

    def complete(self, row: int) -> bool:
        return False  # a trie answer ends with end-of-turn or when accept() fills it in


class GrammarRows:
    """A grammar's matcher in each row of a batch: one grammar for every row, or one per row (a row with None decodes
    freely), as when each item of an evaluation has its own tools."""

    def __init__(self, grammars: list[Grammar | None]):
        self.matchers = [g.matcher() if g is not None else None for g in grammars]
        first = next(g for g in grammars if g is not None)
        self.xgr, self.vocab = first.xgr, first.vocab

    def mask(self, logits: torch.Tensor, alive: list[int]) -> torch.Tensor:
        bm = self.xgr.allocate_token_bitmask(len(alive), self.vocab)  # all allowed until a matcher fills its row
        for j, row in enumerate(alive):
            m = self.matchers[row]
            if m is not None and not m.is_terminated():
                m.fill_next_token_bitmask(bm, j)
        logits = logits.float().contiguous()
        self.xgr.apply_token_bitmask_inplace(logits, bm.to(logits.device), vocab_size=self.vocab)
        return logits

    def accept(self, row: int, token: int) -> None:
        if self.matchers[row] is not None:
            self.matchers[row].accept_token(token)
        return None

    def complete(self, row: int) -> bool:
        """The grammar is satisfied and allows nothing more: the row ends with this token."""
        return self.matchers[row] is not None and self.matchers[row].is_terminated()
