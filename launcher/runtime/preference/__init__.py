"""Preference training (`train.task: dpo | orpo | kto`): the losses (`losses.py`, written from
the papers and TRL's definitions), sequence log-probabilities (`logps.py`), the reference policy
(`reference.py`) and the objectives the trainer's step strategies call (`objectives.py`).
See docs/preference.md."""
