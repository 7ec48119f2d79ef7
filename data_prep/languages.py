"""The language codes sentencex knows, so ``bertpipe shard --language`` can refuse one it does not.

sentencex (1.0.30-1.0.32) has rules of its own for RULES and reaches the others through its fallback table
(``src/languages/fallbacks.rs``: ``de-at`` → ``de``, ``ab`` → ``ru``, ...). Any other code silently gets the
English rules and it offers no way to ask which codes it knows, hence this copy of its tables.
"""

from __future__ import annotations

RULES = frozenset(
    """
    am ar bg bn ca da de el en es fi fr gu hi hy it ja kk kn ml mr my nl pa pl pt ru sk ta te uk
    """.split()  # noqa: SIM905 (a block of codes reads better than hundreds of quoted strings)
)
"""Codes with sentence rules (abbreviations, terminators) of their own."""

FALLBACKS = frozenset(
    """
    aae ab abs ace acm ady ady-cyrl aeb aeb-arab aln als alt ami an anp apc arn arq ary arz ast atj av
    avk awa ay az azb ba ban ban-bali bar bat-smg bbc bbc-latn bcc bci bdr be be-tarask be-x-old bew bgn
    bh bho bjn blk bm bpy bqi btm bug bug-bugi bxr cbk-zam ce ckb co crh crh-cyrl crh-latn cs csb cv
    de-at de-ch de-formal dsb dtp dty dua egl eml eo es-formal et ext fa fit fiu-vro fon frc frp frr fur
    gag gan gan-hans gan-hant gcf gcr gl gld glk gn gom gom-deva gom-latn gor gsw guc hak he hif
    hif-latn hke hrx hsb hsn ht hu hu-formal hyw iba id ii ike-cans ike-latn inh io iu jut jv ka kaa kab
    kbd kbd-cyrl kbp kea kge khw kiu kjh kjp kk-arab kk-cn kk-cyrl kk-kz kk-latn kk-tr kl knc ko ko-kp
    koi kr krc krl ks ks-arab ksh ksw ku ku-arab ku-latn kum kv lad lb lbe lez lg li lij liv ljp lki lld
    lmo ln lrc lt ltg lua luz lv lzh lzz mad mag mai map-bms mdf mg mhr min mk mnc mnc-latn mnc-mong mnw
    mo mrj ms ms-arab mui mwl myv mzn nah nap nb nds nds-nl ne nia nl-informal nn no nrf nrm nyn nyo oc
    olo os pcd pdc pdt pfl pms pnt pt-br pwn qu qug rgn rm rmy ro roa-rup roa-tara rsk rue rup ruq
    ruq-cyrl ruq-latn rut sa sah scn sdc sdh se se-fi se-no se-se ses sg sgs sh sh-cyrl sh-latn shi
    shi-latn shy shy-latn sjd skr skr-arab sli sma smn sq sr sr-cyrl sr-ec sr-el sr-latn srn sro stq sty
    su sv sw szl szy tay tcy tet tg tg-cyrl tg-latn tr trv tt tt-cyrl ttj ty tyv udm ug ug-arab ur vec
    vep vls vmf vmw vot vro wa wls wo wuu wuu-hans wuu-hant xal xmf yi yue yue-hans yue-hant za zh
    zh-classical zh-cn zh-hans zh-hant zh-hk zh-mo zh-my zh-sg zh-tw zh-yue
    """.split()  # noqa: SIM905 (a block of codes reads better than hundreds of quoted strings)
)
"""Codes sentencex maps to other codes (regional variants, related languages, scripts)."""

KNOWN = RULES | FALLBACKS


def check_language(code: str) -> str:
    """``code`` in lower case when sentencex knows it; a ValueError that says what to give otherwise."""
    lowered = code.lower()
    if lowered in KNOWN:
        return lowered
    primary = lowered.split("-", 1)[0]
    hint = (
        f"give {primary}"
        if primary in KNOWN
        else f"give one of its {len(KNOWN)} codes (rules of its own: {' '.join(sorted(RULES))}; others "
        "through its fallbacks, e.g. zh, ko, sv, tr, he)"
    )
    raise ValueError(
        f"--language {code}: the sentence splitter (sentencex) does not know this code and would quietly split "
        f"with English rules; {hint}"
    )
