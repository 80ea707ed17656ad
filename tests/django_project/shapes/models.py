"""Model shapes a target may not fit: multi-table inheritance, a composite primary key
(the system check must name them, tests/e2e/test_django.py)."""

from django.db import models
from docs.models import Document
from pgvector.django import VectorField


class Article(Document):
    summary = models.TextField(blank=True, default="")
    summary_embedding = VectorField(dimensions=8, null=True, blank=True)


class Chunk(models.Model):
    pk = models.CompositePrimaryKey("doc", "seq")
    doc = models.IntegerField()
    seq = models.IntegerField()
    content = models.TextField()
    embedding = VectorField(dimensions=8, null=True, blank=True)
