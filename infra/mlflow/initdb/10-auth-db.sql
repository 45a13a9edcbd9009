-- The tracking store uses database mlflow (POSTGRES_DB); the basic-auth app keeps its users in mlflow_auth.
CREATE DATABASE mlflow_auth OWNER mlflow;
