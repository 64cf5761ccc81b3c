"""Reading, validating and splitting labelled data."""
