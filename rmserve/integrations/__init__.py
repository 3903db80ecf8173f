"""rmserve as the reward in RL trainers.

trl.py      RewardFunction: TRL's reward-function call shape, from an Engine or a server URL
scorers.py  LocalScorer (Engine in this process) and RemoteScorer (POST /v1/score of `rmserve serve`)
verl.py     RmserveRewardManager: a verl reward manager that scores with a running `rmserve serve`
            (imports verl; load it from verl's config, see README)
"""
from .scorers import LocalScorer, RemoteScorer, Scored, make_scorer
from .trl import RewardFunction

__all__ = ["RewardFunction", "LocalScorer", "RemoteScorer", "Scored", "make_scorer"]
