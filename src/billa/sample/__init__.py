"""The embedded sample: data and a tokenizer made offline, for the tiny default and the tests; not readers.

``corpus`` writes all three stages' sample data in the real record formats (``tasks`` generates the stage-2 task
sets and stage-3 instruction sets), ``billa_repo`` lays it out as BiLLa's training code reads it, and ``tokenizer``
builds the tiny default's tokenizer from it with the real vocabulary expansion. These modules make data; reading
data is ``billa.data``'s job, so nothing in ``billa.data`` or ``billa.tokenizer`` imports this package.
"""
