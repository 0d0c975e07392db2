"""The mechanism analyses (issue #13): paper 000's embedding interventions, paper 003's guidance
magnitude, paper 002's overestimation, paper 004's locality. memtrain analyze runs them
(memtrain.eval.analyses.run); each module's docstring says what it measures and how."""
