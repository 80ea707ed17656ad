from django.db import models
from pgvector.django import VectorField


class Organisation(models.Model):
    name = models.CharField(max_length=100)


class Document(models.Model):
    organisation = models.ForeignKey(Organisation, on_delete=models.CASCADE)
    title = models.CharField(max_length=200)
    body = models.TextField(blank=True, default="")
    embedding = VectorField(dimensions=8, null=True, blank=True)

    class Meta:
        db_table = "docs_documents"  # renamed by 0004: the migrations before see the old
