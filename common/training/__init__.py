"""Fine-tuning: the data pipeline (files → chunks → a tokenized Parquet cache), epoch plans and packing, the Ray
Train worker and its parts (attention for packed rows, the memory plan)."""
