-- load_fixtures: the recorded answers, from the repository's fixtures.tsv
\copy fw_tier.fixtures_import FROM 'fixtures.tsv'
SELECT count(*) > 0 AS loaded FROM fw_tier.fixtures;
