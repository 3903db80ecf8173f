"""A verl reward manager that scores every rollout with a running `rmserve serve`. Imports verl:
load it from verl's config, not from rmserve.

verl's built-in discriminative-RM path starts its own vLLM / SGLang servers and has no setting for
an external reward server (verl-project/verl 1dda039b9c6311889a9c9a26040677e1254814f9:
verl/experimental/reward_loop/reward_loop.py RewardLoopManager, verl/workers/config/reward.py
RewardModelConfig). Its reward-manager hook takes a class from a module (verl/utils/import_utils.py `load_module`
accepts pkg://module.name), which is this one:

    reward.reward_model.enable=False
    reward.reward_manager.source=importlib
    reward.reward_manager.module.path=pkg://rmserve.integrations.verl
    reward.reward_manager.name=RmserveRewardManager
    +reward.reward_kwargs.rmserve_url=http://rm-host:8000

Each sample is what verl's own DisRM path scores (`_preprocess_reward_inputs` in the file above,
read, not copied): the dataset's `raw_prompt` chat plus the decoded response with the policy's EOS
text removed, as one conversation, which rmserve renders with the reward model's own template
(so verl needs no copy of the reward model's tokenizer). Concurrent samples from verl's reward
workers are batched by the server. A sample the server cannot score raises (verl has no "no reward").
"""
from __future__ import annotations

import os

from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from .scorers import RemoteScorer

URL_ENV = "RMSERVE_URL"


class RmserveRewardManager(RewardManagerBase):
    """reward.reward_kwargs.rmserve_url (or $RMSERVE_URL): the server; .rmserve_api_key optional."""

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                 reward_model_tokenizer=None, **unused):
        super().__init__(config, tokenizer, compute_score)
        settings = config.reward.get("reward_kwargs", None) or {}
        url = settings.get("rmserve_url") or os.environ.get(URL_ENV)
        if not url:
            raise ValueError("RmserveRewardManager needs the server: "
                             f"+reward.reward_kwargs.rmserve_url=http://host:port (or ${URL_ENV})")
        self.scorer = RemoteScorer(url, api_key=settings.get("rmserve_api_key"))

    def conversation(self, data: DataProto) -> list[dict]:
        item = data[-1:][0]   # multi-sequence outputs: the last sequence, as verl's managers do
        chat = [dict(m) for m in item.non_tensor_batch["raw_prompt"]]
        response_ids = item.batch["responses"]
        valid = int(item.batch["attention_mask"][-response_ids.shape[-1]:].sum())
        response = self.tokenizer.decode(response_ids[:valid])
        if self.tokenizer.eos_token:
            response = response.replace(self.tokenizer.eos_token, "")
        return chat + [{"role": "assistant", "content": response}]

    async def run_single(self, data: DataProto) -> dict:
        conv = await self.loop.run_in_executor(None, self.conversation, data)
        (scored,) = await self.loop.run_in_executor(None, self.scorer.score, [conv])
        if scored.error is not None:
            raise RuntimeError(f"rmserve could not score this rollout: {scored.error}")
        return {"reward_score": scored.score, "reward_extra_info": {}}
