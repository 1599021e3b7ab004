"""Human (and AI) feedback: a preference store on SQLAlchemy, a labeling web app, JSONL in and out.

    hhh label generate --prompts redteam:train --k 4     # sample completions into feedback.db
    hhh label add-labeler ann                            # prints ann's token
    hhh label serve                                      # http://127.0.0.1:8000/
    hhh label auto --reward toxicity                     # or rank them with an AI judge
    hhh label export --out pairs.jsonl                   # prompt/chosen/rejected

Only `rankings` is imported here; the store, the app and the jobs pull in SQLAlchemy, FastAPI and torch.
"""

from hhh.feedback.rankings import RankingError, check_tiers, tiers_to_pairs

__all__ = ["RankingError", "check_tiers", "tiers_to_pairs"]
