"""The prompt-space attack: a hard prompt (a string of vocabulary tokens) that brings a memorized
image back, for an attacker who can only type text.

The PEZ idea (Wen et al. 2023): keep continuous token embeddings P (B, n, d) in the text
encoder's input space; at every step project each row onto its nearest vocabulary embedding,
compute Dori's loss (memtrain.attack.dori) with the *projected* tokens, and apply the gradient
to P (straight-through). The attack's output is the hard prompt with the lowest loss it tried, decoded to a string; the
audit re-encodes that string through the deployed pipeline, so prompt-side transforms (random
tokens inserted, '!' padding) act on it exactly as on a typed prompt. Candidates are whole-word
vocabulary entries only, so the string re-tokenizes to the tokens that were optimized (the
figures are measured on the re-encoded string either way). Same budget (steps, noise samples, timesteps, seed
streams) as the embedding attack; n is the init prompt's token count.
"""

from __future__ import annotations

from typing import Sequence

import torch

from memtrain.attack.dori import AttackResult, DoriAttack
from memtrain.core.errors import MemtrainError
from memtrain.core.text import TokenLayout, token_layout, tokenize
from memtrain.core.tokenizer import END_OF_WORD, whole_word_vocabulary

def word_token_ids(tokenizer) -> torch.Tensor:
    """Ids of whole-word vocabulary entries (ASCII letters, digits), the hard prompt's candidates."""
    ids = sorted(whole_word_vocabulary(tokenizer).values())
    if not ids:
        raise MemtrainError("prompt attack: the tokenizer has no whole-word vocabulary entries")
    return torch.tensor(ids)


class PromptAttack(DoriAttack):
    """Dori's loss and budget, optimized over hard prompts; `result().prompts` holds the strings."""

    def initial_state(self, init_prompts: list[str]) -> tuple[torch.Tensor, TokenLayout]:
        tokenizer = self.mitigation.tokenizer(self.bundle) if self.mitigation is not None else self.bundle.tokenizer
        self.tokenizer = tokenizer
        self.table = self.bundle.text_encoder.get_input_embeddings().weight.detach().float().cpu()
        self.candidates = word_token_ids(tokenizer)
        ids = tokenize(tokenizer, init_prompts)
        lengths = token_layout(ids, tokenizer.eos_token_id).prompt.sum(dim=1)
        self.length = max(1, int(lengths.max()))
        if self.length + 2 > tokenizer.model_max_length:
            raise MemtrainError(f"prompt attack: {self.length} tokens do not fit {tokenizer.model_max_length}")
        if self.config.init == "random":
            start_ids = torch.stack([self.candidates[torch.randint(len(self.candidates), (self.length,), generator=g)]
                                     for g in self.generators])
        elif self.config.init == "other_prompt":
            start_ids = self._prompt_ids([self.config.other_prompt] * len(init_prompts))
        else:
            start_ids = self._prompt_ids(init_prompts)
        self.template = self._template(len(init_prompts))
        layout = token_layout(self.template, tokenizer.eos_token_id)
        return self.table[self._project(self.table[start_ids])].clone(), layout

    def _prompt_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, n) the prompts' token ids, cut or padded (repeating the last token) to n."""
        ids = tokenize(self.tokenizer, list(prompts))
        layout = token_layout(ids, self.tokenizer.eos_token_id)
        rows = []
        for row, mask in zip(ids, layout.prompt):
            own = row[mask][: self.length]
            if len(own) == 0:
                own = self.candidates[:1]
            rows.append(torch.cat([own, own[-1:].expand(self.length - len(own))]))
        return torch.stack(rows)

    def _template(self, batch: int) -> torch.Tensor:
        """(B, L) ids: sot, n placeholder positions, eot, then the tokenizer's padding."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        row = [tok.bos_token_id] + [self.candidates[0].item()] * self.length + [tok.eos_token_id]
        row += [pad] * (tok.model_max_length - len(row))
        return torch.tensor(row).expand(batch, -1).clone()

    def _project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, n) ids of the nearest (L2) candidate vocabulary embedding per position."""
        candidates = self.table[self.candidates]
        dist = torch.cdist(embeddings.detach().float().cpu().flatten(0, 1), candidates)
        return self.candidates[dist.argmin(dim=1)].reshape(embeddings.shape[:2])

    def step(self) -> torch.Tensor:
        """One step; the loss it reports is the loss of the hard prompt it started from, which is
        kept when it is the lowest so far (an attacker keeps the best string it has tried)."""
        tried = self.hard_ids()
        losses = super().step()
        if not hasattr(self, "best_ids"):
            self.best_ids, self.best_loss = tried.clone(), torch.full((len(tried),), float("inf"))
        better = torch.isfinite(losses) & (losses < self.best_loss)
        self.best_ids[better], self.best_loss[better] = tried[better], losses[better]
        return losses

    def token_ids(self) -> torch.Tensor:
        """(B, L) the best hard prompts so far (before any step: the start) as full token rows."""
        ids = self.template.clone()
        ids[:, 1 : 1 + self.length] = self.best_ids if hasattr(self, "best_ids") else self.hard_ids()
        return ids

    def hard_ids(self) -> torch.Tensor:
        """(B, n) the hard prompt the optimized state stands for now (PEZ: its nearest tokens)."""
        return self._project(self.y)

    def token_embeddings(self) -> torch.Tensor:
        """(B, n, d) the input embeddings the encoder sees at the n positions: the projected tokens,
        with straight-through gradients to the continuous P (value: projected; gradient: to y)."""
        projected = self.table[self._project(self.y)].to(self.y.device)
        return self.y + (projected - self.y).detach()

    def condition(self) -> torch.Tensor:
        """Text-encoder states of the hard prompt's tokens, with gradients to the optimized state."""
        tokens = self.token_embeddings()
        encoder = self.bundle.text_encoder

        def swap(module, args, output):
            output = output.clone()
            output[:, 1 : 1 + self.length] = tokens.to(output.dtype)
            return output

        handle = encoder.get_input_embeddings().register_forward_hook(swap)
        try:
            states = encoder(self.template.to(encoder.device)).last_hidden_state
        finally:
            handle.remove()
        states = states.to(self.dtype)
        if self.mitigation is None:
            return states
        return self.mitigation.transform_embeddings(states, self.layout.to(self.device))

    def result(self) -> AttackResult:
        base = super().result()
        ids = self.token_ids()
        prompts = [" ".join(t[: -len(END_OF_WORD)] for t in self.tokenizer.convert_ids_to_tokens(row.tolist()))
                   for row in ids[:, 1 : 1 + self.length]]
        with torch.no_grad():
            states = self.bundle.text_encoder(ids.to(self.bundle.text_encoder.device)).last_hidden_state
        base.embeddings = states.float().cpu()
        base.prompts = prompts
        return base

