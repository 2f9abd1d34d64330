"""The process engine: spawning, supervision, output, cgroups. No HTTP in here."""
