"""Many runs of one recipe: seeds, and searches."""
