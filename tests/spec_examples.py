"""The API spec's example bodies, written once (customer-api.zh.md, scenario 1 "创建新客户")."""

from __future__ import annotations

from typing import Any


def scenario_1_body(user_id: str, phone: str, backup_phone: str) -> dict[str, Any]:
    """Scenario 1: every field, all valid (the spec uses 13800138000 / 13900139000 for the phones)."""
    return {
        "userId": user_id,
        "botId": "bot_001",
        "nickname": "小张",
        "name": "张三",
        "phone": phone,
        "backup_phone": backup_phone,
        "wechat": "zhangsan123",
        "status": 1,
        "community": "万科城",
        "business_type": "whole_rent",
        "room_type": "two_bedroom",
        "room_tags": '["loft", "two_bath"]',
        "move_in_date": "2024-09-01",
        "lease_period": 12,
        "price_range": "5000-8000",
        "source_channel": "referral",
        "creator": "外部Agent系统",
        "internal_notes": "来自Agent系统推送",
    }
