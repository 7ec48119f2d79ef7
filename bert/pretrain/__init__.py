"""Pretraining: the parent side (``stage``, ``launch``) and the ranks (``rank``: ``deepspeed --module bert.pretrain``).

This package imports nothing itself, so the parent side never loads the rank loop or DeepSpeed.
"""
