// Log search alerts on the gateway's custom metrics in Application Insights (customMetrics, dimensions in
// customDimensions): a consumer throttled with 429 for most of five minutes, and any circuit breaker opening.
// The queries live beside this file in ../alerts/*.kql.

param appInsightsId string
param location string
param tags object

@description('429s for one consumer in five minutes, while throttled in at least three of those minutes, that raise the alert.')
@minValue(1)
param throttledRequestsThreshold int = 20

@description('E-mail address to notify; empty for none.')
param alertEmail string = ''

@description('Resource ids of existing action groups to notify as well.')
param actionGroupIds array = []

resource emailGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: 'ag-${uniqueString(appInsightsId)}'
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: 'aigateway'
    enabled: true
    emailReceivers: [
      {
        name: 'operators'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var notify = concat(empty(alertEmail) ? [] : [emailGroup.id], actionGroupIds)

resource consumerThrottled 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'gateway-consumer-throttled-${uniqueString(appInsightsId)}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'AI gateway: consumer throttled (429) for 5 minutes'
    description: 'A consumer kept receiving 429 (its tokens-per-minute limit, or every backend busy) through most of a five-minute window. One alert per consumer (Subscription ID).'
    severity: 3
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      allOf: [
        {
          query: loadTextContent('../alerts/consumer-throttled.kql')
          timeAggregation: 'Total'
          metricMeasureColumn: 'Throttled'
          operator: 'GreaterThanOrEqual'
          threshold: throttledRequestsThreshold
          dimensions: [
            {
              name: 'Consumer'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    // A new Application Insights resource has no custom metrics yet, so validating the query could fail the first
    // deployment; the query is checked by tests/test_bicep.py instead.
    skipQueryValidation: true
    actions: {
      actionGroups: notify
    }
  }
}

resource breakerOpened 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'gateway-breaker-opened-${uniqueString(appInsightsId)}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'AI gateway: circuit breaker opened'
    description: 'A backend was taken out of rotation (breaker transition to open). One alert per backend and region.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      allOf: [
        {
          query: loadTextContent('../alerts/breaker-opened.kql')
          timeAggregation: 'Total'
          metricMeasureColumn: 'Trips'
          operator: 'GreaterThan'
          threshold: 0
          dimensions: [
            {
              name: 'Backend'
              operator: 'Include'
              values: [
                '*'
              ]
            }
            {
              name: 'Region'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    skipQueryValidation: true
    actions: {
      actionGroups: notify
    }
  }
}

output alertRuleIds array = [
  consumerThrottled.id
  breakerOpened.id
]
