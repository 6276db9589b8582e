"""The Markdown collector and the tests that run every code block of README.md and docs/."""
