"""Operations: nightly runs and their ledger, what ``landmarks submit`` sends."""
