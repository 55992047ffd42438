"""VILA-style vision-language models (LongVILA): see the collection README."""
