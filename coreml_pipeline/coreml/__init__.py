"""Core ML side: conversion, reproducible save and read-back, provenance, Core ML-side compression, and the one module that uses private coremltools APIs."""
